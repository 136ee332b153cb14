"""What ``ConAdvModel.fit`` reads: every input Keras' ``fit`` reads, read as Keras reads it.

Keras' ``fit`` of the same model is the reference for how an input becomes
batches, so its own data adapters do it wherever they can:

- a ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches, with
  ``class_weight`` mapped to sample weights by Keras' rule;
- a ``keras.utils.PyDataset``: Keras' enqueuer runs its ``workers`` (threads,
  or processes with ``use_multiprocessing``), shuffles its batch order when
  ``shuffle``, and starts and stops with each epoch;
- a Python generator, or any iterator (which Keras' ``fit`` refuses; it is
  read as a generator of its items): read once, as a stream.

Arrays are read here, as Keras' array adapter reads them (``class_weight``
by Keras' own rule, ``validation_split`` by Keras' own split: the last
fraction, before shuffling), except for the order of a shuffle: a seeded
permutation per epoch, another for each ``fit`` (``FitState.begin``), so a
ConAdv run can be repeated.

``fit`` hands Keras an adapter of its own (``StreamAdapter``) that serves the
batches ``data.py`` keeps and passes Keras' epoch hooks on to the adapter
that needs them. Keras has no public API for its adapters
(``keras.src.trainers.data_adapters``): this module alone imports them.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.trainers.data_adapters import get_data_adapter as keras_data_adapter
from keras.src.trainers.data_adapters.data_adapter import DataAdapter
from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

#: The refusal of a class_weight beside sample weights (Keras refuses it too).
_BOTH_WEIGHTS = (
    "fit takes class_weight or sample weights, not both: fold the class weights into the "
    "sample weights"
)


@dataclasses.dataclass
class Source:
    """The batches an input gives, before ``data.py`` keeps those of one size.

    ``raw``: its ``(x, y)`` or ``(x, y, sample_weight)`` batches, for training.
    ``first``: its first batch. ``keras_adapter``: the Keras adapter whose epoch
    hooks must run (a PyDataset's enqueuer), or None. ``fill(n)``: a dataset of
    its first n batches for ConAdv's ring, read apart from the training stream;
    None for a stream read once (a generator), whose ring is filled from the
    training stream itself. ``num_batches``: batches per epoch as Keras counts
    them, None where unknown.
    """

    raw: tf.data.Dataset
    first: tuple
    keras_adapter: DataAdapter | None = None
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
    return array_slicing.train_validation_split((x, y, sample_weight), validation_split=fraction)


def is_arrays(x) -> bool:
    return isinstance(x, (np.ndarray, tf.Tensor)) or (
        hasattr(x, "__array__") and not isinstance(x, tf.data.Dataset)
    )


def _class_weights_of(y, class_weight) -> np.ndarray:
    """Each example's weight by its class: Keras' rule (class ids, or the argmax of one-hot
    labels; a class without a weight has 1)."""
    return data_adapter_utils.class_weight_to_sample_weights(np.asarray(y), class_weight)


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


def from_dataset(dataset: tf.data.Dataset, class_weight) -> Source:
    """A dataset's batches; ``class_weight`` applied as Keras' dataset adapter applies it."""
    if class_weight is not None and len(dataset.element_spec) == 3:
        raise ValueError(_BOTH_WEIGHTS)
    if class_weight is not None:
        dataset = TFDatasetAdapter(dataset, class_weight=class_weight).get_tf_dataset()
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ValueError("ConAdvModel.fit: the training dataset is empty")
    cardinality = int(dataset.cardinality())
    return Source(dataset, tuple(first), fill=dataset.take, num_batches=max(cardinality, 0) or None)


def from_py_dataset(py_dataset: keras.utils.PyDataset, class_weight, shuffle: bool) -> Source:
    """A PyDataset's batches, produced by Keras' adapter (its workers, its shuffle); the
    ring is filled from its first batches, read here in order on this thread."""
    adapter = keras_data_adapter(py_dataset, class_weight=class_weight, shuffle=shuffle)
    raw = adapter.get_tf_dataset()
    first = adapter._standardize_batch(py_dataset[0])

    def fill(count: int) -> tf.data.Dataset:
        def first_batches():
            for index in range(min(count, py_dataset.num_batches or count)):
                yield adapter._standardize_batch(py_dataset[index])

        return tf.data.Dataset.from_generator(first_batches, output_signature=raw.element_spec)

    return Source(raw, tuple(first), adapter, fill, py_dataset.num_batches)


def from_stream(stream, class_weight) -> Source:
    """A generator's (or an iterator's) batches, read once by Keras' generator adapter."""
    if class_weight is not None:
        raise ValueError(
            "fit(generator) takes no class_weight (neither does Keras'): yield "
            "(images, labels, sample_weights) batches instead"
        )
    stream = iter(stream)
    first = next(stream, None)
    if first is None:
        raise ValueError("ConAdvModel.fit: the training generator yields no batch")
    if not isinstance(first, tuple):
        first = tuple(first) if isinstance(first, list) else (first,)
    generator = (batch for batch in itertools.chain([first], stream))
    adapter = keras_data_adapter(generator)
    return Source(adapter.get_tf_dataset(), first, adapter)


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


class StreamAdapter(DataAdapter):
    """What Keras' ``fit`` reads: ``dataset``, with the epoch hooks of ``keras_adapter``."""

    def __init__(self, dataset: tf.data.Dataset, source: Source):
        self._dataset = dataset
        self._source = source

    def get_tf_dataset(self):
        return self._dataset

    def get_numpy_iterator(self):
        raise NotImplementedError("ConAdvModel runs on the TensorFlow backend")

    def on_epoch_begin(self):
        if self._source.keras_adapter is not None:
            self._source.keras_adapter.on_epoch_begin()

    def on_epoch_end(self):
        if self._source.keras_adapter is not None:
            self._source.keras_adapter.on_epoch_end()

    @property
    def num_batches(self):
        return self._source.num_batches

    @property
    def batch_size(self):
        return None

    @property
    def has_partial_batch(self):
        return False

    @property
    def partial_batch_size(self):
        return None
