"""ImageNet-layout TFRecords: ``train-*`` and ``validation-*`` shards under ``--data_dir``.

Each record holds ``image/encoded`` (JPEG or PNG bytes) and
``image/class/label``. The common ImageNet converter writes labels 1…1000
(``--one_based_labels``); ``input_pipeline.convert`` writes 0-based labels
and a ``labels.txt`` and ``counts.json`` beside the shards (``--dataset=folder``).

Training reads files in parallel (sharded per host by file when there are
enough files), shuffles, decodes and crops in one op, and prefetches; the
evaluation pass reads files in a fixed order. Each record carries its file
name and index, so a label out of range or an undecodable image stops the
run naming both (``--skip_corrupt_records`` skips and counts the images).
"""

from __future__ import annotations

import json
import os
import sys

import tensorflow as tf
from absl import logging

from input_pipeline import preprocessing
from input_pipeline.base import (
    EVAL,
    TRAIN,
    TRAIN_EVAL,
    DataError,
    DataSource,
    bad_record_message,
)

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
SHUFFLE_BUFFER = 10_000
#: TRAIN_EVAL reads at most this many training examples (the first files).
TRAIN_EVAL_EXAMPLES = 50_000


def _files(data_dir: str, prefix: str) -> list[str]:
    return sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{prefix}-*")))


class ImageNetSource(DataSource):
    """Sharded TFRecords in the standard ImageNet layout."""

    name = "imagenet"
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

    @property
    def small_images(self) -> bool:
        return self.image_size <= preprocessing.SMALL_IMAGE_LIMIT

    # ------------------------------------------------------------------ reading

    def _records(self, files, input_context, training):
        """(file name, index in file, serialized record), sharded per input pipeline."""
        ds = tf.data.Dataset.from_tensor_slices(files)
        shard_records = False
        if input_context is not None and input_context.num_input_pipelines > 1:
            n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
            if len(files) >= n:
                ds = ds.shard(n, i)
            else:
                logging.warning(
                    "%d files for %d input pipelines: sharding by record instead", len(files), n
                )
                shard_records = True
        if training:
            ds = ds.shuffle(len(files), seed=self.options.seed, reshuffle_each_iteration=True)
            ds = ds.repeat()

        def read(filename):
            records = tf.data.TFRecordDataset(filename).enumerate()
            return records.map(lambda index, record: (filename, index, record))

        ds = ds.interleave(
            read,
            cycle_length=tf.data.AUTOTUNE if training else 1,
            num_parallel_calls=tf.data.AUTOTUNE if training else None,
            deterministic=self.options.deterministic if training else None,
        )
        if shard_records:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds

    def _parse(self, filename, index, record):
        example = tf.io.parse_single_example(record, FEATURES)
        label = tf.cast(example["image/class/label"], tf.int32) - self.label_offset
        in_range = tf.logical_and(label >= 0, label < self.num_classes)
        check = tf.debugging.Assert(
            in_range,
            [
                bad_record_message(
                    "label {} (after offset) outside [0, --num_classes={})",
                    [label, self.num_classes],
                    filename,
                    index,
                    "check --one_based_labels and --num_classes",
                )
            ],
        )
        with tf.control_dependencies([check]):
            label = tf.identity(label)
        return example["image/encoded"], label

    def _image_or_flag(self, filename, index, image_bytes, preprocess):
        """``(preprocess(image_bytes), True)``, or a blank image and False if it fails.

        A graph has no try/except; a one-element dataset with ``ignore_errors``
        is one, so a corrupt image is caught where its file and record index
        are still known. Without ``--skip_corrupt_records`` the failure stops
        the run naming both.
        """
        size = self.image_size
        decoded = tf.data.Dataset.from_tensors(image_bytes).map(preprocess).ignore_errors()
        blank = tf.data.Dataset.from_tensors((tf.zeros([size, size, 3]), False))
        image, ok = decoded.map(lambda x: (x, True)).concatenate(blank).take(1).get_single_element()
        image.set_shape([size, size, 3])
        if not self.options.skip_corrupt_records:
            check = tf.debugging.Assert(
                ok,
                [
                    bad_record_message(
                        "undecodable image", [], filename, index, "pass --skip_corrupt_records"
                    )
                ],
            )
            with tf.control_dependencies([check]):
                image = tf.identity(image)
        return image, ok

    def _train_map(self, filename, index, record):
        image_bytes, label = self._parse(filename, index, record)
        seed = None
        if self.options.deterministic and self.options.seed is not None:
            # Per-record seed: the same record always gets the same crop.
            file_key = tf.strings.to_hash_bucket_fast(filename, 2**31)
            seed = tf.stack([tf.constant(self.options.seed, tf.int64), file_key * 100_003 + index])
        augment_fn = self.augment_fn

        def preprocess(data):
            if self.small_images:
                return preprocessing.small_image_train(
                    preprocessing.decode_any(data),
                    self.image_size,
                    seed=seed,
                    augment_fn=augment_fn,
                )
            return preprocessing.preprocess_for_train(
                data, self.image_size, seed=seed, augment_fn=augment_fn
            )

        image, ok = self._image_or_flag(filename, index, image_bytes, preprocess)
        return image, label, ok, filename, index

    def _eval_map(self, filename, index, record):
        image_bytes, label = self._parse(filename, index, record)

        def preprocess(data):
            if self.small_images:
                return preprocessing.small_image_eval(
                    preprocessing.decode_any(data), self.image_size
                )
            return preprocessing.preprocess_for_eval(data, self.image_size)

        image, ok = self._image_or_flag(filename, index, image_bytes, preprocess)
        return image, label, ok, filename, index

    def _drop_corrupt(self, ds):
        """Removes flagged records, logging each with a running count (when
        skipping); otherwise the map has already stopped at the first one."""
        if self.options.skip_corrupt_records:

            def count(skipped, element):
                _, _, ok, filename, index = element
                skipped += tf.cast(tf.logical_not(ok), tf.int64)

                def log():
                    tf.print(
                        "skipped corrupt record: file",
                        filename,
                        "record",
                        index,
                        "; corrupt records skipped so far:",
                        skipped,
                        output_stream=sys.stderr,
                    )
                    return tf.constant(True)

                tf.cond(ok, lambda: tf.constant(False), log)
                return skipped, element

            ds = ds.scan(tf.constant(0, tf.int64), count)
            ds = ds.filter(lambda image, label, ok, filename, index: ok)
        return ds.map(lambda image, label, ok, filename, index: (image, label))

    def dataset(self, split, batch_size, input_context=None):
        if split == TRAIN:
            ds = self._records(self.train_files, input_context, training=True)
            ds = ds.shuffle(SHUFFLE_BUFFER, seed=self.options.seed)
            ds = ds.map(
                self._train_map,
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=self.options.deterministic,
            )
            ds = self._drop_corrupt(ds).batch(batch_size, drop_remainder=True)
        elif split in (EVAL, TRAIN_EVAL):
            files = self.eval_files if split == EVAL else self.train_files
            ds = self._records(files, input_context, training=False)
            if split == TRAIN_EVAL:
                ds = ds.take(TRAIN_EVAL_EXAMPLES)
            ds = ds.map(self._eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = self._drop_corrupt(ds)
            if self.options.cache_eval:
                ds = ds.cache()
            ds = ds.batch(batch_size)
        else:
            raise ValueError(f"unknown split {split!r}")
        options = tf.data.Options()
        options.deterministic = self.options.deterministic or split != TRAIN
        ds = ds.with_options(options)
        if self.options.tf_data_service and split == TRAIN:
            # Preprocessing runs on the service's workers; every consumer reads
            # its own full stream of epochs (its own shuffle, as locally).
            ds = ds.apply(
                tf.data.experimental.service.distribute(
                    processing_mode="parallel_epochs",
                    service=self.options.tf_data_service,
                )
            )
        return ds.prefetch(tf.data.AUTOTUNE)


class FolderSource(ImageNetSource):
    """TFRecords written by ``python -m input_pipeline.convert`` from class folders."""

    name = "folder"

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
