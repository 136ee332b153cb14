"""The embedded default dataset: scikit-learn's handwritten digits.

1,797 real 8×8 greyscale scans (UCI "optdigits", shipped inside scikit-learn,
so nothing is downloaded). Pixels 0–16 are rescaled to 0–255, resized to the
model's input size and repeated to RGB. The split is a fixed stratified 80/20
(1,437 train / 360 eval), the same on every machine.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf

from input_pipeline import epochs, preprocessing
from input_pipeline.base import EVAL, SELECTION, TRAIN, TRAIN_EVAL, DataError, DataSource

_SPLIT_SEED = 20220425  # fixed: the split must never change between runs
_EVAL_FRACTION = 0.2


def load_digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified split as uint8 [N, 8, 8] images and int32 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=_EVAL_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    return {TRAIN: (x_train, y_train), EVAL: (x_eval, y_eval)}


class DigitsSource(DataSource):
    """Handwritten digits, in memory, at any image size."""

    name = "digits"
    nominal_sizes = (10, 1_437, 360)
    # The scans are 8×8; 16 px keeps the default run within minutes on a CPU.
    default_image_size = 16
    holds_out_selection = True

    @classmethod
    def create(cls, *, name, image_size, data_dir, num_classes, options, **kwargs):
        if num_classes not in (None, 10):
            raise DataError(f"--num_classes={num_classes}: the digits dataset has 10 classes")
        source = super().create(
            name=name, image_size=image_size, data_dir=data_dir, num_classes=None, options=options
        )
        if kwargs.get("train_examples") is not None:
            source.keep_training_subset(kwargs["train_examples"])
        return source

    def __init__(self, image_size, options=None):
        self._splits = load_digits_split()
        # The scans themselves, before --train_examples keeps a subset (a flag of its own).
        digest = hashlib.sha256()
        for split in (TRAIN, EVAL):
            for array in self._splits[split]:
                digest.update(np.ascontiguousarray(array).tobytes())
        self._digest = digest.hexdigest()
        super().__init__(
            image_size,
            options,
            num_classes=10,
            num_train_examples=len(self._splits[TRAIN][1]),
            num_eval_examples=len(self._splits[EVAL][1]),
        )
        if self.selection is not None:
            self._hold_out_selection()
        self._pixels = {split: self._resize(images) for split, (images, _) in self._splits.items()}
        self.class_names = [str(digit) for digit in range(10)]

    def _hold_out_selection(self):
        """Moves the selection set out of the training split: each example is keyed by its
        index in the fixed split (``input_pipeline/selection.py``), before
        ``--train_examples`` keeps a subset of the rest."""
        images, labels = self._splits[TRAIN]
        keys = [f"digits/train/{index}" for index in range(len(labels))]
        held = self.selection.held_out(keys, labels, self.num_classes)
        self._splits[SELECTION] = (images[held], labels[held])
        self._splits[TRAIN] = (images[~held], labels[~held])
        self.num_selection_examples = int(held.sum())
        self.num_train_examples = len(labels) - self.num_selection_examples

    def content(self) -> dict:
        return {"dataset": self.name, "sha256": self._digest}

    def keep_training_subset(self, count: int):
        """Keeps ``count`` training examples, stratified by class, drawn with a fixed seed
        (the same subset for every run; ``--train_examples``)."""
        images, labels = self._splits[TRAIN]
        # A stratified subset leaves at least one example of each class out, or none.
        if not (10 <= count <= len(labels) - 10 or count == len(labels)):
            raise DataError(
                f"--train_examples={count}: the digits training set has {len(labels)} "
                f"examples; keep 10 to {len(labels) - 10} of them, or all {len(labels)}"
            )
        if count < len(labels):
            from sklearn.model_selection import train_test_split

            keep, _ = train_test_split(
                np.arange(len(labels)), train_size=count, stratify=labels, random_state=_SPLIT_SEED
            )
            keep = np.sort(keep)
            self._splits[TRAIN] = (images[keep], labels[keep])
            self._pixels[TRAIN] = self._pixels[TRAIN][keep]
            self.num_train_examples = count

    def _resize(self, images: np.ndarray) -> np.ndarray:
        """Resizes once, up front: the whole set is a few MB at 32×32."""
        x = tf.convert_to_tensor(images[..., None], tf.float32)
        x = tf.image.resize(x, [self.image_size, self.image_size], method="bilinear")
        x = tf.clip_by_value(tf.round(x), 0.0, 255.0)
        return tf.tile(x, [1, 1, 1, 3]).numpy()

    def _augment(self, position, image, label):
        """``--augment`` on one training image; with ``--seed`` its draw depends
        only on the example's position in the stream, so resumes repeat it."""
        seed = None
        if self.options.seed is not None:
            seed = tf.stack([tf.constant(self.options.seed, tf.int64), position])
        return preprocessing.augment_pixels(image, self.augment_fn, seed), label

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        if split == TRAIN:
            return self._train_stream(batch_size, input_context, start_step)
        if split not in (EVAL, TRAIN_EVAL, SELECTION):
            raise ValueError(f"unknown split {split!r}")
        if split == SELECTION and SELECTION not in self._splits:
            raise ValueError("no selection set: the source was built without --selection_examples")
        source_split = TRAIN if split == TRAIN_EVAL else split
        ds = tf.data.Dataset.from_tensor_slices(
            (self._pixels[source_split], self._splits[source_split][1])
        )
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def _train_stream(self, batch_size, input_context, start_step):
        """One global stream, whatever the layout: replica r of R gets rows
        [r·B, (r+1)·B) of each global batch of R·B examples.

        The set is small, so every input pipeline reads all of it and keeps
        its replicas' rows: a step sees the same examples on one host with R
        replicas as on R workers with one each (tests/test_multi_worker.py),
        and a run may resume on another layout with the same global batch.
        """
        labels = self._splits[TRAIN][1]
        examples = tf.data.Dataset.from_tensor_slices((self._pixels[TRAIN], labels))
        replicas, pipelines, pipeline = 1, 1, 0
        if input_context is not None:
            replicas = input_context.num_replicas_in_sync
            pipelines = input_context.num_input_pipelines
            pipeline = input_context.input_pipeline_id

        def epoch(index):
            # The whole set is one block: a full permutation per epoch.
            seed = epochs.epoch_seed(self.options.seed, index)
            return epochs.permute_blocks(examples, len(labels), seed)

        global_batch = batch_size * replicas
        start = start_step * global_batch
        stream = epochs.epochs_from(epoch, lambda: len(labels), start)
        # Each example's position in the global stream seeds its augmentation.
        stream = stream.enumerate(start=start).map(
            lambda position, element: (position, *element[1])
        )
        if pipelines > 1:
            share = global_batch // pipelines  # this pipeline's replicas' rows
            first = pipeline * share
            stream = stream.batch(global_batch, drop_remainder=True)
            stream = stream.map(
                lambda *columns: tuple(column[first : first + share] for column in columns)
            ).unbatch()
        if self.augment_fn is not None:
            stream = stream.map(
                lambda position, image, label: (position, *self._augment(position, image, label)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        stream = stream.map(lambda position, image, label: (image, label))
        return stream.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
