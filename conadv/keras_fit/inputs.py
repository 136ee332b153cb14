"""What ``ConAdvModel.fit`` reads: every input Keras' ``fit`` reads, read as Keras reads it.

- arrays: batched here, ``class_weight`` mapped to sample weights by Keras'
  rule (class ids, or the argmax of one-hot labels; a class without a weight
  has 1), ``validation_split`` as Keras splits (the last fraction, before
  shuffling); the order of a shuffle is a seeded permutation per epoch,
  another for each ``fit`` (``FitState.begin``), so a ConAdv run repeats;
- a ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches;
- a ``keras.utils.PyDataset``: its batches read in order by ``workers``
  threads (``use_multiprocessing`` is refused: tf.data runs threads), its
  batch order shuffled each epoch when ``shuffle``, its ``on_epoch_begin`` /
  ``on_epoch_end`` called by ``EpochHooks``;
- a Python generator, or any iterator: read once, as a stream.

Only Keras' public API is used, so a Keras upgrade does not break ``fit``;
Keras' own ``fit`` of the same model is the test of every input
(``tests/test_keras_fit_inputs.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

#: The refusal of a class_weight beside sample weights (Keras refuses it too).
_BOTH_WEIGHTS = (
    "fit takes class_weight or sample weights, not both: fold the class weights into the "
    "sample weights"
)


@dataclasses.dataclass
class Source:
    """The batches an input gives, before ``data.py`` keeps those of one size.

    ``raw``: its ``(x, y)`` or ``(x, y, sample_weight)`` batches, for training.
    ``first``: its first batch. ``py_dataset``: the PyDataset whose epoch hooks
    must run, or None. ``fill(n)``: a dataset of
    its first n batches for ConAdv's ring, read apart from the training stream;
    None for a stream read once (a generator), whose ring is filled from the
    training stream itself. ``num_batches``: batches per epoch as Keras counts
    them, None where unknown.
    """

    raw: tf.data.Dataset
    first: tuple
    py_dataset: keras.utils.PyDataset | None = None
    fill: Callable[[int], tf.data.Dataset] | None = None
    num_batches: int | None = None
    #: Examples each epoch leaves out (arrays: the remainder of the last batch).
    remainder: int = 0


def validation_split(x, y, sample_weight, fraction):
    """``(x, y, sample_weight)`` for training and the validation data: Keras' own split
    (the last ``fraction`` of the arrays, before any shuffling)."""
    if not is_arrays(x):
        raise ValueError(
            f"validation_split takes arrays, got {type(x).__name__}: pass validation_data "
            "for a dataset, PyDataset or generator"
        )
    count = len(y)
    split_at = int(math.floor(count * (1.0 - fraction)))
    if split_at in (0, count):
        raise ValueError(
            f"validation_split={fraction} leaves no training or no validation example of "
            f"the {count}: give a fraction that splits them"
        )
    arrays = (x, y, sample_weight)
    train = tuple(None if a is None else a[:split_at] for a in arrays)
    return train, tuple(None if a is None else a[split_at:] for a in arrays)


def is_arrays(x) -> bool:
    return isinstance(x, (np.ndarray, tf.Tensor)) or (
        hasattr(x, "__array__") and not isinstance(x, tf.data.Dataset)
    )


def _class_ids(y) -> np.ndarray:
    """Class ids of labels as Keras reads them for ``class_weight``: ids of shape (N,) or
    (N, 1), rounded, or the argmax of one-hot (N, C)."""
    y = np.asarray(y)
    if y.ndim > 1:
        y = np.argmax(y, axis=-1) if y.shape[-1] != 1 else np.squeeze(y, axis=-1)
    return np.round(y).astype("int32")


def _class_weights_of(y, class_weight) -> np.ndarray:
    """Each example's weight by its class: Keras' rule (a class without a weight has 1)."""
    return np.array([class_weight.get(int(c), 1.0) for c in _class_ids(y)], np.float32)


def from_arrays(x, y, sample_weight, class_weight, batch_size: int, shuffle, seed: int) -> Source:
    """Batches of ``batch_size`` from arrays, each epoch in a permutation of ``seed``'s
    stream (if ``shuffle``); the remainder of each epoch is left out."""
    if y is None:
        raise ValueError("fit(images, labels, batch_size=...): the labels (class ids) are missing")
    if shuffle not in (True, False):
        raise ValueError(
            f"fit(arrays) takes shuffle=True or False, got {shuffle!r}: ConAdvModel shuffles "
            "examples, not batches"
        )
    if class_weight is not None:
        if sample_weight is not None:
            raise ValueError(_BOTH_WEIGHTS)
        sample_weight = _class_weights_of(y, class_weight)
    arrays = [np.asarray(x), np.asarray(y)]
    if sample_weight is not None:
        arrays.append(np.asarray(sample_weight, dtype=np.float32))
    count = len(arrays[1])
    if any(len(a) != count for a in arrays):
        sizes = ", ".join(str(len(a)) for a in arrays)
        raise ValueError(f"fit's arrays hold {sizes} examples: give as many of each")
    if count < batch_size:
        raise ValueError(
            f"fit got {count} examples, fewer than one batch of {batch_size}: "
            "give a smaller batch_size"
        )
    dataset = tf.data.Dataset.from_tensor_slices(tuple(arrays))
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    first = tuple(a[:batch_size] for a in arrays)
    return Source(dataset, first, None, dataset.take, count // batch_size, count % batch_size)


def _with_class_weights(dataset: tf.data.Dataset, class_weight) -> tf.data.Dataset:
    """A dataset's ``(x, y)`` batches with ``class_weight`` as their third element."""
    table = tf.constant(
        [class_weight.get(c, 1.0) for c in range(max(class_weight) + 1)], tf.float32
    )

    def weigh(x, y):
        ids = tf.ensure_shape(tf.numpy_function(_class_ids, [y], tf.int32), y.shape[:1])
        weights = tf.gather(table, tf.clip_by_value(ids, 0, len(table) - 1))
        outside = tf.logical_or(ids < 0, ids >= len(table))  # a class without a weight: 1
        return x, y, tf.where(outside, tf.ones_like(weights), weights)

    return dataset.map(weigh)


def from_dataset(dataset: tf.data.Dataset, class_weight) -> Source:
    """A dataset's batches; ``class_weight`` applied as Keras applies it."""
    if class_weight is not None and len(dataset.element_spec) == 3:
        raise ValueError(_BOTH_WEIGHTS)
    if class_weight is not None:
        dataset = _with_class_weights(dataset, class_weight)
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ValueError("ConAdvModel.fit: the training dataset is empty")
    cardinality = int(dataset.cardinality())
    return Source(dataset, tuple(first), fill=dataset.take, num_batches=max(cardinality, 0) or None)


def _as_batch(batch, class_weight) -> tuple:
    """A PyDataset's or generator's batch as a tuple of arrays, class weights added."""
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        batch = (batch,)
    if class_weight is not None:
        if len(batch) == 3:
            raise ValueError(_BOTH_WEIGHTS)
        batch = (*batch, _class_weights_of(batch[1], class_weight))
    return tuple(np.asarray(part) for part in batch)


def _signature(batch: tuple) -> tuple:
    return tuple(tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)) for a in batch)


def from_py_dataset(py_dataset: keras.utils.PyDataset, class_weight, shuffle: bool) -> Source:
    """A PyDataset's batches, read by ``workers`` threads in order (the order shuffled each
    epoch when ``shuffle``); the ring is filled from its first batches."""
    if py_dataset.use_multiprocessing:
        raise ValueError(
            "ConAdvModel.fit reads a PyDataset with threads (its workers): give "
            "use_multiprocessing=False"
        )
    first = _as_batch(py_dataset[0], class_weight)
    spec = _signature(first)
    count = py_dataset.num_batches

    def load(index):
        return _as_batch(py_dataset[int(index)], class_weight)

    def batches(indices: tf.data.Dataset) -> tf.data.Dataset:
        def read(index):
            parts = tf.numpy_function(load, [index], [s.dtype for s in spec])
            return tuple(tf.ensure_shape(p, s.shape) for p, s in zip(parts, spec))

        workers = max(int(py_dataset.workers), 1)
        return indices.map(read, num_parallel_calls=workers, deterministic=True)

    indices = tf.data.Dataset.range(count) if count is not None else tf.data.Dataset.counter()
    training = indices
    if shuffle and count is not None:
        training = indices.shuffle(count, reshuffle_each_iteration=True)
    raw = batches(training).prefetch(max(int(py_dataset.max_queue_size), 1))

    def fill(n: int) -> tf.data.Dataset:
        return batches(indices.take(n))

    return Source(raw, first, py_dataset, fill, count)


def from_stream(stream, class_weight) -> Source:
    """A generator's (or an iterator's) batches, read once."""
    if class_weight is not None:
        raise ValueError(
            "fit(generator) takes no class_weight (neither does Keras'): yield "
            "(images, labels, sample_weights) batches instead"
        )
    stream = iter(stream)
    first = next(stream, None)
    if first is None:
        raise ValueError("ConAdvModel.fit: the training generator yields no batch")
    first = _as_batch(first, None)
    rest = (_as_batch(batch, None) for batch in stream)
    batches = itertools.chain([first], rest)
    raw = tf.data.Dataset.from_generator(lambda: batches, output_signature=_signature(first))
    return Source(raw, first)


def read(x, y, sample_weight, class_weight, batch_size, shuffle, seed: int) -> Source:
    """The ``Source`` of ``fit``'s inputs, or a one-line ValueError naming what to give."""
    if is_arrays(x):
        return from_arrays(x, y, sample_weight, class_weight, batch_size, shuffle, seed)
    if y is not None or batch_size is not None or sample_weight is not None:
        raise ValueError(
            f"fit({type(x).__name__}): give the labels, sample weights and batch size in its "
            "batches, not as fit's y, sample_weight or batch_size"
        )
    if isinstance(x, tf.data.Dataset):
        return from_dataset(x, class_weight)
    if isinstance(x, keras.utils.PyDataset):
        return from_py_dataset(x, class_weight, bool(shuffle))
    if isinstance(x, types.GeneratorType) or (hasattr(x, "__next__") and hasattr(x, "__iter__")):
        return from_stream(x, class_weight)
    raise ValueError(
        f"ConAdvModel.fit takes arrays, a tf.data.Dataset, a keras.utils.PyDataset or a "
        f"generator of (images, labels) batches, got {type(x).__name__}"
    )


class EpochHooks(keras.callbacks.Callback):
    """Calls a PyDataset's ``on_epoch_begin`` and ``on_epoch_end``, as Keras' fit does."""

    def __init__(self, py_dataset: keras.utils.PyDataset):
        super().__init__()
        self.py_dataset = py_dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.py_dataset.on_epoch_begin()

    def on_epoch_end(self, epoch, logs=None):
        self.py_dataset.on_epoch_end()
