"""The batches ``ConAdvModel.fit`` trains on: one batch shape, labels as the loss takes them.

ConAdv's ring buffer holds batches in fixed slots, and the loss divides by
a fixed global batch, so every batch trained on has one known shape. Keras
users batch without ``drop_remainder`` (``dataset.batch(32)``, arrays with
``batch_size``), which leaves a smaller last batch each epoch: it is skipped,
and ``fit`` warns once, saying how many examples that was. Labels are
accepted as Keras' losses accept them: class ids of shape (B,) or (B, 1)
(``SparseCategoricalCrossentropy``), or target distributions (B, C)
(``CategoricalCrossentropy``); they reach the steps as int32 ids (B,) or
float32 targets (B, C).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

IDS, TARGETS = "ids", "targets"

#: Where Keras, TensorFlow and ConAdv live: a warning points past their frames.
_LIBRARIES = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (keras, tf, sys.modules[__name__.split(".")[0]])
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside the libraries (the user's ``fit``),
    for a warning issued by the function that calls this."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level


class SkippedBatches:
    """Counts the partial batches the input pipeline drops (fed from the pipeline itself)."""

    def __init__(self):
        self.batches = 0
        self.examples = 0

    def note(self, size) -> bool:
        self.batches += 1
        self.examples += int(size)
        return False


@dataclasses.dataclass
class TrainingData:
    """What ``fit`` trains on: full batches of a static shape."""

    dataset: tf.data.Dataset
    batch_size: int
    #: A few images of the first batch (for ``ConAdvModel``'s check of its outputs).
    first_images: tf.Tensor
    #: The counter of skipped partial batches, for a dataset whose batches vary.
    skipped: SkippedBatches | None = None


def _skip_message(examples: int, batches: int, batch_size: int, where: str) -> str:
    return (
        f"ConAdvModel.fit skips {examples} example(s) in {batches} partial batch(es) {where}: "
        f"ConAdv's ring holds batches of one size ({batch_size}); batch with "
        "drop_remainder=True (or a batch size that divides the data) to choose what is left out"
    )


class SkipReporter(keras.callbacks.Callback):
    """Warns once per ``fit``, after the first epoch that skipped examples, how many."""

    def __init__(self, skipped: SkippedBatches, batch_size: int):
        super().__init__()
        self.skipped = skipped
        self.batch_size = batch_size
        self._seen = (skipped.batches, skipped.examples)
        self._warned = False

    def on_epoch_end(self, epoch, logs=None):
        batches = self.skipped.batches - self._seen[0]
        examples = self.skipped.examples - self._seen[1]
        self._seen = (self.skipped.batches, self.skipped.examples)
        if batches and not self._warned:
            self._warned = True
            message = _skip_message(examples, batches, self.batch_size, f"in epoch {epoch + 1}")
            warnings.warn(message, stacklevel=_user_stacklevel())


def label_kind(shape, num_classes: int) -> str:
    """``IDS`` for class ids (B,) or (B, 1), ``TARGETS`` for (B, C) targets, or a one-line
    ValueError: the one rule for training, evaluation and the ring."""
    shape = tf.TensorShape(shape)
    if shape.rank == 1 or (shape.rank == 2 and shape[-1] == 1):
        return IDS
    if shape.rank == 2 and shape[-1] == num_classes:
        return TARGETS
    raise ValueError(
        f"labels of shape {shape} do not fit the model's {num_classes} classes: give class ids "
        f"of shape (batch,) or (batch, 1), or one-hot targets of shape (batch, {num_classes})"
    )


def keras_loss(labels, logits, sample_weight=None) -> tf.Tensor:
    """The mean loss Keras' ``evaluate`` reports: ``SparseCategoricalCrossentropy`` (or, for
    targets, ``CategoricalCrossentropy``) from the logits, no label smoothing, each example
    weighted by ``sample_weight`` and the sum divided by the batch, as Keras divides it."""
    if label_kind(labels.shape, logits.shape[-1]) == TARGETS:
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return tf.reduce_mean(loss_fn(labels, logits, sample_weight=sample_weight))


def _describe(spec) -> str:
    """One dataset component, as a refusal names it."""
    if isinstance(spec, tf.TensorSpec):
        return f"one tensor of shape {spec.shape} ({spec.dtype.name})"
    if isinstance(spec, dict):
        return f"a dict of {sorted(spec)}"
    return f"a {type(spec).__name__}"


def _check_element(spec) -> None:
    if not isinstance(spec, tuple) or len(spec) == 1:
        alone = _describe(spec[0] if isinstance(spec, tuple) else spec)
        raise ValueError(
            f"ConAdvModel.fit trains on (images, labels) batches, got batches of {alone} "
            "and no labels: give a dataset of (images, labels), e.g. "
            "tf.data.Dataset.zip((images, labels))"
        )
    if len(spec) == 3:
        raise ValueError(
            "ConAdvModel.fit trains on (images, labels) batches, got (images, labels, "
            "sample weights): ConAdv does not weight examples; give a dataset of (images, labels)"
        )
    if len(spec) != 2:
        raise ValueError(
            f"ConAdvModel.fit trains on (images, labels) batches, got batches of {len(spec)} "
            "components: give a dataset of (images, labels)"
        )
    images = spec[0]
    if not isinstance(images, tf.TensorSpec) or images.shape.rank is None:
        raise ValueError(
            f"ConAdvModel.fit takes one image tensor per batch, got {images}: a model with "
            "several inputs is not supported"
        )
    if not images.shape[1:].is_fully_defined():
        raise ValueError(
            f"ConAdvModel.fit needs images of one known size (the ring's slots are fixed), got "
            f"batches of shape {images.shape}: resize them to one size in the dataset"
        )


def _from_arrays(x, y, batch_size: int | None, shuffle: bool, seed: int):
    """Batches of ``batch_size`` (default 32) from arrays; the remainder is skipped each epoch."""
    if y is None:
        raise ValueError("fit(images, labels, batch_size=...): the labels (class ids) are missing")
    count = len(y)
    batch_size = int(batch_size or 32)
    if count < batch_size:
        raise ValueError(
            f"fit got {count} examples, fewer than one batch of {batch_size}: "
            "give a smaller batch_size"
        )
    dataset = tf.data.Dataset.from_tensor_slices((np.asarray(x), np.asarray(y)))
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    remainder = count % batch_size
    if remainder:
        where = f"each epoch ({count} examples, batches of {batch_size})"
        warnings.warn(_skip_message(remainder, 1, batch_size, where), stacklevel=_user_stacklevel())
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset, batch_size, tf.convert_to_tensor(np.asarray(x[:batch_size])), None


def _from_dataset(dataset: tf.data.Dataset):
    """The dataset's batches of the size of its first, the others skipped and counted."""
    _check_element(dataset.element_spec)
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ValueError("ConAdvModel.fit: the training dataset is empty")
    static = dataset.element_spec[0].shape[0]
    if static is not None:
        return dataset, int(static), first[0], None
    batch_size = int(tf.shape(first[0])[0])
    skipped = SkippedBatches()

    def full(images, labels):
        size = tf.shape(images)[0]
        return tf.cond(
            tf.equal(size, batch_size),
            lambda: tf.constant(True),
            lambda: tf.py_function(skipped.note, [size], tf.bool),
        )

    return dataset.filter(full), batch_size, first[0], skipped


def training_data(x, y, batch_size, shuffle: bool, seed: int, num_classes) -> TrainingData:
    """``fit``'s inputs (a dataset, or arrays with ``batch_size``) as ``TrainingData``;
    ``num_classes(image_spec)`` is the number of classes the model scores."""
    if isinstance(x, tf.data.Dataset):
        if y is not None or batch_size is not None:
            raise ValueError(
                "fit(dataset): give the labels and batch size in the dataset, not here"
            )
        dataset, batch_size, first, skipped = _from_dataset(x)
    elif isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "__array__"):
        dataset, batch_size, first, skipped = _from_arrays(x, y, batch_size, shuffle, seed)
    else:
        raise ValueError(
            f"ConAdvModel.fit takes a tf.data.Dataset of (images, labels) or arrays, "
            f"got {type(x).__name__}"
        )
    images, labels = dataset.element_spec
    kind = label_kind(labels.shape, num_classes(images))

    def as_trained(images, labels):
        images = tf.ensure_shape(images, [batch_size, *images.shape[1:]])
        if kind == IDS:
            return images, tf.ensure_shape(
                tf.cast(tf.reshape(labels, [-1]), tf.int32), [batch_size]
            )
        return images, tf.ensure_shape(tf.cast(labels, tf.float32), [batch_size, labels.shape[-1]])

    dataset = dataset.map(as_trained).prefetch(tf.data.AUTOTUNE)
    return TrainingData(dataset, batch_size, first[:16], skipped)
