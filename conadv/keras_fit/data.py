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
from collections.abc import Callable

import keras
import tensorflow as tf

from conadv.keras_fit import inputs

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
    """What ``fit`` trains on: full batches of a static shape, ``(images, labels)`` or
    ``(images, labels, weights)``."""

    #: What Keras' ``fit`` reads: the batches kept.
    dataset: tf.data.Dataset
    batch_size: int
    #: A few images of the first batch (for ``ConAdvModel``'s check of its outputs).
    first_images: tf.Tensor
    #: Whether the batches carry example weights (sample or class weights).
    weighted: bool
    #: ``fill(n)``: the first n batches for ConAdv's ring, read apart from training;
    #: None where the ring is filled from the training stream (a generator).
    fill: Callable[[int], tf.data.Dataset] | None
    #: The counter of skipped partial batches, for a dataset whose batches vary.
    skipped: SkippedBatches | None = None
    #: The PyDataset whose epoch hooks ``fit`` calls (``inputs.EpochHooks``), or None.
    py_dataset: keras.utils.PyDataset | None = None


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
    if len(spec) not in (2, 3):
        raise ValueError(
            f"ConAdvModel.fit trains on (images, labels) or (images, labels, sample weights) "
            f"batches, got batches of {len(spec)} components"
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
    if len(spec) == 3:
        weights = spec[2]
        shape = getattr(weights, "shape", tf.TensorShape(None))
        if not (shape.rank == 1 or (shape.rank == 2 and shape[-1] == 1)):
            raise ValueError(
                f"ConAdvModel.fit weights each example: give sample weights of shape (batch,) "
                f"or (batch, 1), got {_describe(weights)}"
            )


def _full_batches(dataset: tf.data.Dataset, batch_size: int):
    """The dataset's batches of ``batch_size``, and the counter of those skipped (None when
    every batch has that size by the dataset's own shape)."""
    if dataset.element_spec[0].shape[0] is not None:
        return dataset, None
    skipped = SkippedBatches()

    def full(images, *rest):
        size = tf.shape(images)[0]
        return tf.cond(
            tf.equal(size, batch_size),
            lambda: tf.constant(True),
            lambda: tf.py_function(skipped.note, [size], tf.bool),
        )

    return dataset.filter(full), skipped


def training_data(
    x, y, batch_size, shuffle: bool, seed: int, num_classes, sample_weight=None, class_weight=None
) -> TrainingData:
    """``fit``'s inputs (``inputs.read``) as ``TrainingData``; ``num_classes(image_spec)``
    is the number of classes the model scores."""
    if inputs.is_arrays(x):
        batch_size = int(batch_size or 32)
    source = inputs.read(x, y, sample_weight, class_weight, batch_size, shuffle, seed)
    _check_element(source.raw.element_spec)
    first_images = tf.convert_to_tensor(source.first[0])
    batch_size = int(first_images.shape[0])
    if source.remainder:
        count = source.num_batches * batch_size + source.remainder
        where = f"each epoch ({count} examples, batches of {batch_size})"
        warnings.warn(
            _skip_message(source.remainder, 1, batch_size, where), stacklevel=_user_stacklevel()
        )
    images, labels, *weights = source.raw.element_spec
    kind = label_kind(labels.shape, num_classes(images))

    def as_trained(images, labels, *weights):
        images = tf.ensure_shape(images, [batch_size, *images.shape[1:]])
        if kind == IDS:
            labels = tf.ensure_shape(tf.cast(tf.reshape(labels, [-1]), tf.int32), [batch_size])
        else:
            labels = tf.ensure_shape(tf.cast(labels, tf.float32), [batch_size, labels.shape[-1]])
        weights = [tf.reshape(tf.cast(w, tf.float32), [batch_size]) for w in weights]
        return (images, labels, *weights)

    def batches(dataset):
        return dataset.map(as_trained).prefetch(tf.data.AUTOTUNE)

    dataset, skipped = _full_batches(source.raw, batch_size)
    kept = batches(dataset)
    if skipped is None and source.num_batches is not None:
        kept = kept.apply(tf.data.experimental.assert_cardinality(source.num_batches))
    fill = None
    if source.fill is not None:

        def fill(count):
            return batches(_full_batches(source.fill(count), batch_size)[0]).take(count)

    return TrainingData(
        kept,
        batch_size,
        first_images[:16],
        bool(weights),
        fill,
        skipped,
        source.py_dataset,
    )
