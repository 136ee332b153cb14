"""``--dataset=tfds:NAME``: an image classification dataset of tensorflow-datasets.

Reads a dataset already prepared under ``--data_dir`` (TFDS's default
directory when unset) and downloads nothing unless ``--tfds_download`` is
given. Images are read still encoded (``SkipDecoding``), so the same fused
decode-and-crop, augmentation and bad-record checks as for ``imagenet`` apply;
the file and record a check names come from the example's ``tfds_id``. The
evaluation split is ``validation`` when the dataset has one, else ``test``.
A resumed run takes an epoch's length from the records per file that TFDS
wrote into the dataset's metadata, without reading the split.
``--selection_examples`` holds out records keyed by the file part of their
``tfds_id`` and their index in that file; the metadata's counts less the
selection table's held-out records per file give a resumed epoch's length.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from input_pipeline.base import EVAL, TRAIN, DataError
from input_pipeline.records import RecordSource


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "--dataset=tfds:NAME needs tensorflow-datasets: pip install -e '.[tfds]'"
        ) from None
    return tfds


class TFDSSource(RecordSource):
    """A TFDS builder with an image feature and a class-label feature."""

    name = "tfds"

    @classmethod
    def create(cls, *, name, image_size, data_dir, num_classes, options, **kwargs):
        return cls(
            name.split(":", 1)[1],
            data_dir=data_dir,
            image_size=image_size,
            options=options,
            num_classes=num_classes,
            **kwargs,
        )

    def __init__(
        self,
        tfds_name: str,
        data_dir: str | None = None,
        image_size: int | None = None,
        options=None,
        num_classes: int | None = None,
        tfds_download: bool = False,
    ):
        tfds = _import_tfds()
        self._tfds = tfds
        flag = f"--dataset=tfds:{tfds_name}"
        try:
            self.builder = tfds.builder(tfds_name, data_dir=data_dir)
        except Exception as error:  # tfds raises several types for unknown names
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DataError(
                f"{flag}: no such dataset in tensorflow-datasets or under --data_dir={data_dir} "
                f"({type(error).__name__}: {first_line})"
            ) from None
        if not self.builder.is_prepared():
            if not tfds_download:
                raise DataError(
                    f"{flag} is not prepared under --data_dir={data_dir}; prepare it there "
                    "(tfds build) or pass --tfds_download to download it now"
                )
            self.builder.download_and_prepare()
        info = self.builder.info
        self.image_key, self.label_key = self._supervised_keys(info, flag)
        splits = info.splits
        if TRAIN not in splits:
            raise DataError(f"{flag} has no 'train' split (it has {', '.join(splits)})")
        self.eval_split = "validation" if "validation" in splits else "test"
        if self.eval_split not in splits:
            raise DataError(f"{flag} has neither a 'validation' nor a 'test' split")
        native = info.features[self.image_key].shape[0]
        super().__init__(
            image_size or native or self.default_image_size,
            options,
            num_classes=num_classes or info.features[self.label_key].num_classes,
            num_train_examples=splits["train"].num_examples,
            num_eval_examples=splits[self.eval_split].num_examples,
        )

    def content(self) -> dict:
        """TFDS's name, config and version, and the size of every split."""
        info = self.builder.info
        return {
            "dataset": "tfds",
            "full_name": info.full_name,
            "splits": {name: split.num_examples for name, split in info.splits.items()},
        }

    @staticmethod
    def _supervised_keys(info, flag):
        keys = info.supervised_keys
        if keys is None or len(keys) != 2:
            raise DataError(f"{flag} has no (image, label) supervised keys")
        image_key, label_key = keys
        if not hasattr(info.features[label_key], "num_classes"):
            raise DataError(f"{flag}: feature {label_key!r} is not a class label")
        return image_key, label_key

    def _split_name(self, split):
        return self.eval_split if split == EVAL else "train"

    def _train_file_count(self) -> int:
        return self.builder.info.splits[self._split_name(TRAIN)].num_shards

    def file_counts(self, split=TRAIN) -> list[tuple[str, int]]:
        """``(file, records)`` of each file of ``split``, in the order TFDS reads them.

        From the shard lengths TFDS recorded in ``dataset_info.json`` when it
        prepared the dataset: no record file is opened.
        """
        instructions = self.builder.info.splits[self._split_name(split)].file_instructions
        return [(os.fspath(i.filename), int(i.take)) for i in instructions]

    def selection_layout(self) -> list:
        return [[os.path.basename(f), records] for f, records in self.file_counts(TRAIN)]

    @staticmethod
    def _by_file(input_context, num_files) -> bool:
        """Whether input pipelines take whole files (TFDS's ``input_context``
        sharding, file ``i::n``) rather than every n-th record."""
        pipelines = input_context.num_input_pipelines if input_context else 1
        return pipelines > 1 and num_files >= pipelines

    def _epoch_record_count(self, input_context) -> int:
        # A resumed run needs this pipeline's epoch length; the metadata has it,
        # so the split (all of ImageNet for tfds:imagenet2012) is never read for it.
        counts = [records for _, records in self.file_counts(TRAIN)]
        if self.selection is not None:  # less each file's held-out records
            table = self._selection_table()
            counts = [r - table.held_in(name) for name, r in self.file_counts(TRAIN)]
        if input_context is None or input_context.num_input_pipelines <= 1:
            return sum(counts)
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if self._by_file(input_context, len(counts)):
            return sum(counts[i::n])
        return len(range(i, sum(counts), n))

    def _split_records(self, split, input_context, epoch=None):
        # TFDS reads files in its own fixed order here (its file shuffle takes
        # only a Python seed); each epoch's records are shuffled by the
        # epoch-seeded buffer of RecordSource instead.
        tfds = self._tfds
        name = self._split_name(split)
        pipelines = input_context.num_input_pipelines if input_context else 1
        shards = self.builder.info.splits[name].num_shards
        by_file = self._by_file(input_context, shards)
        read_config = tfds.ReadConfig(
            input_context=input_context if by_file else None,
            shuffle_seed=self.options.seed,
            add_tfds_id=True,
        )
        ds = self.builder.as_dataset(
            split=name,
            shuffle_files=False,
            read_config=read_config,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        ).map(self._locate)
        ds = self._select(ds, split)  # before sharding by record
        if pipelines > 1 and not by_file:
            logging.warning(
                "%d files for %d input pipelines: sharding by record instead", shards, pipelines
            )
            ds = ds.shard(pipelines, input_context.input_pipeline_id)
        return ds

    @staticmethod
    def _locate(example):
        # tfds_id is "<file>__<index in file>".
        parts = tf.strings.split(example["tfds_id"], "__")
        index = tf.strings.to_number(parts[-1], tf.int64)
        return parts[0], index, example

    def _decode_record(self, record):
        return record[self.image_key], tf.cast(record[self.label_key], tf.int32)
