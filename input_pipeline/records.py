"""What every source of encoded-image records shares: decode, crop, augment, check.

A record source (``imagenet``, ``folder``, ``tfds:NAME``) yields ``(file name,
index in file, record)``; this module turns that stream into batches: the
MLPerf-style crop decoded in one op, ``--augment``, and the in-graph checks
that stop a run at a bad label or an undecodable image naming the file and
record (``--skip_corrupt_records`` skips the images and counts them).
With ``--selection_examples`` the records are filtered in the graph, before
any sharding by record: ``TRAIN`` and ``TRAIN_EVAL`` keep the training records
not held out, ``SELECTION`` the held-out ones (``input_pipeline/selection_table.py``).
"""

from __future__ import annotations

import abc
import sys

import tensorflow as tf
from absl import logging

from input_pipeline import data_service, epochs, preprocessing, selection_table
from input_pipeline.base import (
    EVAL,
    SELECTION,
    TRAIN,
    TRAIN_EVAL,
    DataError,
    DataSource,
    bad_record_message,
)

SHUFFLE_BUFFER = 10_000
#: TRAIN_EVAL reads at most this many training examples (the first files).
TRAIN_EVAL_EXAMPLES = 50_000
#: For ``_split_records``: every training record in a fixed order, none held out (the pass
#: that chooses the selection set reads it).
ALL_TRAINING = "all_training"


def _one_element_options() -> tf.data.Options:
    """Options for the per-record one-element dataset: no graph rewrites or
    autotuning, whose fixed cost would be paid once per image."""
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    options.experimental_warm_start = False
    return options


_ONE_ELEMENT_OPTIONS = _one_element_options()


class RecordSource(DataSource):
    """A source of encoded JPEG/PNG images with integer labels, in files."""

    default_image_size = 224
    holds_out_selection = True

    def __init__(self, image_size, options, num_classes, num_train_examples, num_eval_examples):
        super().__init__(
            image_size,
            options,
            num_classes=num_classes,
            num_train_examples=num_train_examples,
            num_eval_examples=num_eval_examples,
        )
        self._table = None
        if self.selection is not None:
            # Known without reading the data; the first stream checks it (selection_table).
            self.num_selection_examples = self.selection.count(self.num_train_examples)
            self.num_train_examples -= self.num_selection_examples

    @property
    def small_images(self) -> bool:
        return self.image_size <= preprocessing.SMALL_IMAGE_LIMIT

    @abc.abstractmethod
    def _split_records(self, split, input_context, epoch=None):
        """``(file name, index in file, record)`` of ``TRAIN``, ``EVAL``,
        ``TRAIN_EVAL``, ``SELECTION`` or ``ALL_TRAINING``, sharded per input
        pipeline, one pass; ``_select`` applied before any sharding by record.

        For ``TRAIN``, ``epoch`` (an int64 tensor) seeds the file order of
        that epoch; otherwise the order is fixed.
        """

    @abc.abstractmethod
    def selection_layout(self) -> list:
        """The training files as the selection table is keyed and checked by: base names,
        or ``[base name, records]`` where the metadata has the counts."""

    def _record_label(self, record):
        """A record's 0-based label, parsing no more than it needs (the selection pass)."""
        return self._decode_record(record)[1]

    def _selection_table(self) -> selection_table.SelectionTable:
        """The selection set's thresholds and per-file counts: one pass over the training
        labels the first time (eagerly, before a stream is built), then remembered."""
        if self._table is None:
            records = self._split_records(ALL_TRAINING, None)
            self._table = selection_table.table_for(self, records, self._record_label)
        return self._table

    def _select(self, records, split):
        """``records`` of ``split`` less the held-out ones (``TRAIN``, ``TRAIN_EVAL``) or only
        them (``SELECTION``); others unchanged."""
        if self.selection is None or split not in (TRAIN, TRAIN_EVAL, SELECTION):
            return records
        table, keep_held = self._selection_table(), split == SELECTION

        def mark(filename, index, record):
            held = table.held_out(self.selection, filename, index, self._record_label(record))
            return filename, index, record, tf.equal(held, keep_held)

        # The label parse and hash in a parallel map (in order); the filter only reads it.
        marked = records.map(mark, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        kept = marked.filter(lambda filename, index, record, keep: keep)
        return kept.map(lambda filename, index, record, keep: (filename, index, record))

    def _epoch_record_count(self, input_context) -> int:
        """Records of one training epoch of this input pipeline.

        Asked only when a run resumes; this default reads the pipeline's
        records once (not decoding them). Sources that know their counts
        override it.
        """
        logging.info("Counting this input pipeline's training records to resume at the right batch")
        records = self._split_records(TRAIN, input_context, epoch=tf.constant(0, tf.int64))
        return epochs.count_records(records)

    @abc.abstractmethod
    def _decode_record(self, record):
        """``(encoded image bytes, 0-based int32 label)`` of one record."""

    def _parse(self, filename, index, record):
        """The record's image bytes and label; a label outside [0, num_classes)
        stops the run naming the file and record."""
        image_bytes, label = self._decode_record(record)
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
        return image_bytes, label

    def _decode_or_flag(self, filename, index, image_bytes, decode):
        """``(decode(image_bytes), True)``, or a small blank image and False if it fails.

        A graph has no try/except; a one-element dataset with ``ignore_errors``
        is one, so a corrupt image is caught where its file and record index
        are still known. Only the decode runs inside it: the per-record cost
        of the nested dataset grows with the function it wraps. Without
        ``--skip_corrupt_records`` the failure stops the run naming both.
        """
        if not self.options.check_decode:
            return decode(image_bytes), tf.constant(True)
        decoded = tf.data.Dataset.from_tensors(image_bytes).map(decode).ignore_errors()
        # An empty image stands for "failed": a decoded one is never empty.
        blank = tf.data.Dataset.from_tensors(tf.zeros([0, 0, 3], tf.uint8))
        single = decoded.concatenate(blank).take(1).with_options(_ONE_ELEMENT_OPTIONS)
        image = single.get_single_element()
        image.set_shape([None, None, 3])
        ok = tf.size(image) > 0
        # Later steps (resize) need pixels; the flagged record is dropped or stops the run.
        image = tf.cond(ok, lambda: image, lambda: tf.zeros([8, 8, 3], tf.uint8))
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

    def _train_map(self, epoch, filename, index, record, seeded=False):
        """``seeded``: per-record seeds even without ``--deterministic`` (fast mode, where
        every epoch is a new job whose unseeded draws would repeat the last one's)."""
        image_bytes, label = self._parse(filename, index, record)
        seed = None
        if (self.options.deterministic or seeded) and self.options.seed is not None:
            # Per-record and per-epoch seed: a resumed run draws the same crops.
            file_key = tf.strings.to_hash_bucket_fast(filename, 2**31)
            seed = tf.random.experimental.stateless_fold_in(
                epochs.epoch_seed(self.options.seed, epoch, salt=2), file_key * 100_003 + index
            )
        augment_fn = self.augment_fn
        if self.small_images:
            decoded, ok = self._decode_or_flag(
                filename, index, image_bytes, preprocessing.decode_any
            )
            image = preprocessing.small_image_train(
                decoded, self.image_size, seed=seed, augment_fn=augment_fn
            )
        else:
            crop_seed, flip_seed, augment_seed = preprocessing.split_seed(seed)
            crop, ok = self._decode_or_flag(
                filename,
                index,
                image_bytes,
                lambda data: preprocessing.decode_and_random_crop(data, crop_seed),
            )
            image = preprocessing.train_from_crop(
                crop, self.image_size, flip_seed, augment_fn, augment_seed
            )
        return image, label, ok, filename, index

    def _eval_map(self, filename, index, record):
        image_bytes, label = self._parse(filename, index, record)
        if self.small_images:
            decoded, ok = self._decode_or_flag(
                filename, index, image_bytes, preprocessing.decode_any
            )
            image = preprocessing.small_image_eval(decoded, self.image_size)
        else:
            crop, ok = self._decode_or_flag(
                filename, index, image_bytes, preprocessing.decode_and_center_crop
            )
            image = preprocessing.resize(crop, self.image_size)
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

    def _train_epoch(self, input_context, epoch):
        """One epoch of this pipeline's records in its seeded order (not decoded)."""
        records = self._split_records(TRAIN, input_context, epoch=epoch)
        # A block larger than the split costs memory and mixes nothing more.
        block = max(1, min(SHUFFLE_BUFFER, self.num_train_examples))
        return epochs.permute_blocks(
            records, block, epochs.epoch_seed(self.options.seed, epoch, salt=1)
        )

    def _train_file_count(self) -> int:
        """Files of the training split (fast mode needs one per input pipeline)."""
        raise NotImplementedError

    def _fast_train_stream(self, per_replica_batch, input_context, start_step):
        """The training examples of epoch after epoch, each epoch shared by the tf.data
        service's workers (``data_service``, fast mode); from ``start_step`` on, the first
        epoch cut to the examples its remaining steps read."""
        pipelines = input_context.num_input_pipelines if input_context is not None else 1
        if self._train_file_count() < pipelines:
            # Dynamic sharding hands out files; sharding each file's records among the
            # input pipelines would be done per service worker, not per pipeline, and
            # lose or repeat examples. ImageNet has 1024 files, more than any cluster's hosts.
            raise DataError(
                f"--tf_data_service_workers={self.options.tf_data_service_workers} (fast "
                f"mode) shares each epoch's files among {pipelines} input pipelines, but the "
                f"training split has {self._train_file_count()} files; write at least "
                f"{pipelines} (python -m input_pipeline.convert) or use "
                "--tf_data_service_workers=1"
            )
        start = start_step * epochs.records_per_step(per_replica_batch, input_context)
        first, left = 0, -1
        if start > 0:
            size = int(self._epoch_record_count(input_context))
            first, offset = divmod(start, size)
            left = size - offset
        block = max(1, min(SHUFFLE_BUFFER, self.num_train_examples))

        def epoch(number):
            # The file order is the epoch's; the records' order need not be reproducible
            # (a seeded tensor is refused by shuffle under a global seed).
            records = self._split_records(TRAIN, input_context, epoch=number).shuffle(block)
            examples = records.map(
                lambda *record: self._train_map(number, *record, seeded=True),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=False,
            )
            remote = data_service.distribute_epoch(
                self._drop_corrupt(examples), self.options.tf_data_service
            )
            return remote.take(tf.where(number == first, tf.constant(left, tf.int64), -1))

        stream = tf.data.Dataset.range(first, epochs.MAX_EPOCHS).flat_map(epoch)
        return stream.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        if split == SELECTION and self.selection is None:
            raise ValueError("no selection set: the source was built without --selection_examples")
        if self.selection is not None:
            self._selection_table()  # eagerly: the streams' functions only read it
        service, fast, timeout = self.options.tf_data_service, False, self.options.peer_timeout
        if service and split == TRAIN:
            workers = self.options.tf_data_service_workers
            if workers == 0:  # not settled by main.py: the dispatcher's count now
                workers = data_service.settle_workers(service, 0, timeout)
            fast = data_service.mode(workers) == data_service.FAST
        if fast:
            ds = self._fast_train_stream(batch_size, input_context, start_step)
            ds = ds.batch(batch_size, drop_remainder=True)
        elif split == TRAIN:
            ds = epochs.epochs_from(
                lambda epoch: self._train_epoch(input_context, epoch),
                lambda: self._epoch_record_count(input_context),
                start_step * epochs.records_per_step(batch_size, input_context),
            )
            ds = ds.map(
                lambda epoch, record: self._train_map(epoch, *record),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=self.options.deterministic,
            )
            ds = self._drop_corrupt(ds).batch(batch_size, drop_remainder=True)
        elif split in (EVAL, TRAIN_EVAL, SELECTION):
            ds = self._split_records(split, input_context)
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
        options.deterministic = (self.options.deterministic and not fast) or split != TRAIN
        ds = ds.with_options(options)
        if service and split == TRAIN and not fast:
            # Preprocessing runs on the service's one worker (several cannot
            # keep the stream's order, see data_service); every input pipeline
            # reads its own stream of epochs from its start step, as locally.
            ds = data_service.distribute(ds, service, timeout)
        return ds.prefetch(tf.data.AUTOTUNE)
