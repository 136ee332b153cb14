"""ImageNet-layout TFRecords: ``train-*`` and ``validation-*`` shards under ``--data_dir``.

Each record holds ``image/encoded`` (JPEG or PNG bytes) and
``image/class/label``. The common ImageNet converter writes labels 1…1000
(``--one_based_labels``); ``input_pipeline.convert`` writes 0-based labels
and a ``labels.txt`` and ``counts.json`` beside the shards (``--dataset=folder``).

Training reads files in parallel (sharded per host by file when there are
enough files) and shuffles; the evaluation pass reads files in a fixed order.
Decoding, cropping, augmentation and the bad-record checks are shared with the
other record sources (``input_pipeline.records``). ``--selection_examples``
holds out records keyed by shard base name and index in the shard; a resumed
run takes the held-out records per file from the selection table.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import tensorflow as tf
from absl import logging

from input_pipeline import epochs
from input_pipeline.base import EVAL, TRAIN, DataError
from input_pipeline.records import RecordSource

#: Training files read at once (interleaved).
READ_CYCLE = 16

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def _files(data_dir: str, prefix: str) -> list[str]:
    return sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{prefix}-*")))


#: Bytes read from each end of a shard for the data's fingerprint.
FINGERPRINT_BYTES = 1 << 16


def _ends_digest(path: str) -> str:
    """SHA-256 of the first and last ``FINGERPRINT_BYTES`` of a file: shards of equal
    sizes (uncompressed images, a re-conversion in another order) still differ."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        size = f.size()
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def _sizes(files: list[str]) -> dict[str, int]:
    """{file name: bytes} of each file (in parallel: many round trips on GCS)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        sizes = pool.map(lambda f: tf.io.gfile.stat(f).length, files)
    return {os.path.basename(f): int(size) for f, size in zip(files, sizes)}


class ImageNetSource(RecordSource):
    """Sharded TFRecords in the standard ImageNet layout."""

    name = "imagenet"
    nominal_sizes = (1000, 1_281_167, 50_000)
    default_image_size = 224
    train_prefix, eval_prefix = "train", "validation"

    @classmethod
    def create(cls, *, name, image_size, data_dir, num_classes, options, **kwargs):
        return cls(
            data_dir,
            image_size=image_size or cls.default_image_size,
            options=options,
            num_classes=num_classes,
            **kwargs,
        )

    def __init__(
        self,
        data_dir: str,
        image_size: int = 224,
        options=None,
        num_classes: int | None = None,
        one_based_labels: bool = False,
        num_train_examples: int | None = None,
        num_eval_examples: int | None = None,
    ):
        super().__init__(
            image_size,
            options,
            num_classes=num_classes or 1000,
            num_train_examples=num_train_examples or 1_281_167,
            num_eval_examples=num_eval_examples or 50_000,
        )
        self.data_dir = data_dir
        self.train_files = _files(data_dir, self.train_prefix)
        self.eval_files = _files(data_dir, self.eval_prefix)
        if not self.train_files or not self.eval_files:
            missing = self.train_prefix if not self.train_files else self.eval_prefix
            raise DataError(
                f"--data_dir={data_dir} has no {missing}-* files; expected TFRecord shards "
                f"named {self.train_prefix}-* and {self.eval_prefix}-*"
            )
        self.label_offset = 1 if one_based_labels else 0

    def content(self) -> dict:
        """The shards' names and sizes, and the bytes at both ends of the first training
        and the first evaluation shard (four reads, whatever the data's size): the same
        shards under another --data_dir are the same data."""
        return {
            "dataset": self.name,
            "train_files": _sizes(self.train_files),
            "eval_files": _sizes(self.eval_files),
            "first_shards": [_ends_digest(self.train_files[0]), _ends_digest(self.eval_files[0])],
        }

    # ------------------------------------------------------------------ reading

    def _pipeline_files(self, files, input_context):
        """This input pipeline's files, and whether records (not files) are sharded."""
        if input_context is None or input_context.num_input_pipelines <= 1:
            return files, False
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= n:
            return files[i::n], False  # what Dataset.shard(n, i) keeps
        return files, True

    def _records(self, files, input_context, epoch=None, split=None):
        """(file name, index in file, serialized record), sharded per input pipeline; the
        records of ``split`` (``RecordSource._select``) before any sharding by record."""
        files, shard_records = self._pipeline_files(files, input_context)
        if shard_records:
            logging.warning(
                "%d files for %d input pipelines: sharding by record instead",
                len(files),
                input_context.num_input_pipelines,
            )
        ds = tf.data.Dataset.from_tensor_slices(files)
        training = epoch is not None
        if training:
            order = epochs.shuffled(tf.constant(files), epochs.epoch_seed(self.options.seed, epoch))
            ds = tf.data.Dataset.from_tensor_slices(order)

        def read(filename):
            records = tf.data.TFRecordDataset(filename).enumerate()
            return records.map(lambda index, record: (filename, index, record))

        # A fixed cycle length (not AUTOTUNE, which follows the core count)
        # keeps the deterministic order the same on every machine.
        ds = ds.interleave(
            read,
            cycle_length=min(len(files), READ_CYCLE) if training else 1,
            num_parallel_calls=tf.data.AUTOTUNE if training else None,
            # Sharded by record below: every pipeline must see one order.
            deterministic=(self.options.deterministic or shard_records) if training else None,
        )
        ds = self._select(ds, split)
        if shard_records:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds

    def _train_file_count(self) -> int:
        return len(self.train_files)

    def _split_records(self, split, input_context, epoch=None):
        files = self.eval_files if split == EVAL else self.train_files
        return self._records(files, input_context, epoch if split == TRAIN else None, split)

    def _epoch_record_count(self, input_context):
        files, shard_records = self._pipeline_files(self.train_files, input_context)
        if self.selection is not None:  # the table counts every file's kept records
            total = self._selection_table().kept(files)
        else:
            total = self._train_record_count(files)
        if shard_records:
            n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
            return len(range(i, total, n))
        return total

    def _train_record_count(self, files) -> int:
        """Records in these training files: counted when a run first resumes on this
        machine, then remembered (keyed by the files' names and sizes)."""
        sizes = list(_sizes(files).values())
        key = hashlib.sha256(json.dumps(list(zip(files, sizes))).encode()).hexdigest()[:16]
        cache = os.path.join(os.path.expanduser("~"), ".cache", "conadv", "record_counts")
        path = os.path.join(cache, f"{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                return int(json.load(f)["records"])
        logging.info(
            "Counting the records of %d training files to resume at the right batch "
            "(once per machine; remembered in %s)",
            len(files),
            cache,
        )
        reader = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
        count = epochs.count_records(reader)
        try:
            os.makedirs(cache, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"records": count, "files": len(files)}, f)
            os.replace(path + ".tmp", path)
        except OSError as error:  # a read-only home: count again next time
            logging.warning("Could not remember the record count in %s: %s", cache, error)
        return count

    def selection_layout(self) -> list:
        return [os.path.basename(f) for f in self.train_files]

    def _record_label(self, record):
        label_only = {"image/class/label": FEATURES["image/class/label"]}
        label = tf.io.parse_single_example(record, label_only)["image/class/label"]
        return tf.cast(label, tf.int32) - self.label_offset

    def _decode_record(self, record):
        example = tf.io.parse_single_example(record, FEATURES)
        label = tf.cast(example["image/class/label"], tf.int32) - self.label_offset
        return example["image/encoded"], label


class FolderSource(ImageNetSource):
    """TFRecords written by ``python -m input_pipeline.convert`` from class folders."""

    name = "folder"
    nominal_sizes = None  # counts.json says

    def __init__(self, data_dir, image_size=224, options=None, num_classes=None, **kwargs):
        counts_path = os.path.join(data_dir, "counts.json")
        if not tf.io.gfile.exists(counts_path):
            raise DataError(
                f"--data_dir={data_dir} has no counts.json: convert your image folders with "
                "python -m input_pipeline.convert --src DIR --out DIR"
            )
        with tf.io.gfile.GFile(counts_path) as f:
            counts = json.load(f)
        super().__init__(
            data_dir,
            image_size=image_size,
            options=options,
            num_classes=num_classes or counts["num_classes"],
            num_train_examples=counts["train"],
            num_eval_examples=counts["validation"],
        )
        #: Records per training file, by file name, when the converter wrote them.
        self._file_counts = counts.get("train_files", {})
        self._counts = counts
        self._label_names = None
        labels_path = os.path.join(data_dir, "labels.txt")
        if tf.io.gfile.exists(labels_path):
            with tf.io.gfile.GFile(labels_path) as f:
                names = [line.strip() for line in f if line.strip()]
            self._label_names = names
            if len(names) == self.num_classes:
                self.class_names = names

    def content(self) -> dict:
        """The shards' names and sizes, ``counts.json`` and ``labels.txt``."""
        return {**super().content(), "counts": self._counts, "labels": self._label_names}

    def selection_layout(self) -> list:
        """The shards with their records, where ``counts.json`` has them."""
        names = super().selection_layout()
        if all(name in self._file_counts for name in names):
            return [[name, self._file_counts[name]] for name in names]
        return names

    def _train_record_count(self, files):
        names = [os.path.basename(f) for f in files]
        if all(name in self._file_counts for name in names):
            return sum(self._file_counts[name] for name in names)
        return super()._train_record_count(files)
