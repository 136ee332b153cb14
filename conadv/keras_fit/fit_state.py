"""What ``ConAdvModel.fit`` trains with besides the model: the step, the ring, the loop.

``FitState`` holds the step context and replica step of ``conadv/steps.py``
for one batch shape, ConAdv's ring and what filled it. The ring follows
the data: a ``fit`` on the same data (the same objects) continues its
stream, so two ``fit``s of one epoch are one of two; other data, or weights
loaded or set, refill it from the current weights before the next step,
with the first τ batches of a fresh pass over the data (of the training
stream itself for a generator, which is read once), attacked with the seeds
of stream positions t … t+τ−1 for the optimizer's step t.

``train_function`` is the loop Keras' ``fit`` calls: up to
``steps_per_execution`` replica steps in one ``tf.function``, a
``tf.while_loop`` that stops where the epoch's data ends (the next batch is
taken only for a step that will run), with ``strategy.run`` in its body —
Keras' own loop puts the step under a ``tf.cond``, where the optimizer's
cross-replica ``merge_call`` fails under MirroredStrategy
(keras-team/keras#19246).
"""

from __future__ import annotations

import weakref

import keras
import tensorflow as tf

from conadv import steps as steps_lib
from conadv.keras_fit import data as data_lib
from conadv.ring_buffer import RingBuffer
from official.model_conversion import ConversionError


def _reference(value):
    """A weak reference where the object allows one (arrays, datasets), else the object."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


def _num_classes(network, images: tf.TensorSpec) -> int:
    """The classes ``network`` scores, from its output shape (a symbolic call for a
    subclassed model); a model of fewer than 2 is refused."""
    try:
        shape = network.output_shape
    except (AttributeError, ValueError):
        shape = network.compute_output_spec(keras.KerasTensor(images.shape, images.dtype)).shape
    classes = shape[-1]
    if classes is None or classes < 2:
        raise ConversionError(
            f"model {network.name!r} outputs {classes} unit(s) per example: ConAdv trains a "
            "softmax classifier of 2 or more classes"
        )
    return int(classes)


def _check_outputs_are_logits(network, images, strategy):
    """Refuses a network whose outputs are probabilities (every row non-negative, summing to
    1): a softmax ``logits_model`` could not see (in a custom or Lambda layer) would
    otherwise be trained as logits, silently."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return  # an eager call outside the TPU's replica context cannot read its variables
    outputs = network(images, training=False)
    tolerance = 1e-4 if outputs.dtype == tf.float32 else 1e-2  # a 16-bit softmax's rows
    outputs = tf.cast(outputs, tf.float32)
    sums = tf.reduce_sum(outputs, axis=-1)
    if bool(tf.reduce_all(outputs >= 0.0) and tf.reduce_all(tf.abs(sums - 1.0) < tolerance)):
        raise ConversionError(
            f"the outputs of model {network.name!r} are probabilities (each row sums to 1) "
            "from a softmax ConAdvModel cannot take off: end the model in "
            "Dense(activation='softmax') or keras.layers.Softmax, or output the logits"
        )


def _check_activity_regularizers(network, strategy):
    """Refuses activity regularizers where several local replicas trace the step in threads
    of their own: Keras keeps their penalties in one list per layer, which the replicas'
    forward passes (interleaved at every synchronized BatchNorm update) clear and fill
    together, so a replica could lose its own penalty from its loss."""
    try:
        threads = len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one device, no threads
        threads = 1
    if threads < 2 or isinstance(strategy, tf.distribute.TPUStrategy):
        return
    layers = [
        layer.name
        for layer in network._flatten_layers(include_self=False)
        if getattr(layer, "activity_regularizer", None) is not None
    ]
    if layers:
        raise ValueError(
            f"layer {layers[0]!r} has an activity regularizer, which {type(strategy).__name__} "
            f"with {threads} local replicas would mix between them: train on one device, or "
            "regularize the weights (kernel_regularizer) instead"
        )


def _next_batches(iterator, count: int):
    """Up to ``count`` batches from ``iterator`` (fewer where it ends)."""
    for _ in range(count):
        batch = iterator.get_next_as_optional()
        if not bool(batch.has_value()):
            return
        yield batch.get_value()


class FitState:
    """The step context, replica step and ring of a ``ConAdvModel`` for one batch shape."""

    def __init__(self, model):
        self.model = model
        self.context: steps_lib.StepContext | None = None
        self.replica_step = None
        self.ring: RingBuffer | None = None
        # A host-side flag, not ring.is_filled(): reading that variable before every
        # call of the train function would make the host wait for the device.
        self.ring_ready = False
        self._source = None  # weak references to what the ring was filled from
        self._data: data_lib.TrainingData | None = None
        self._prologue = None
        self._outputs_checked = False

    def mark_for_refill(self):
        self.ring_ready = False

    def begin(self, x, y, batch_size, shuffle, sample_weight, class_weight):
        """What a ``fit`` on ``x`` (and ``y``, ``sample_weight``, ``class_weight``) trains
        on (``data.TrainingData``), the step context ready for it."""
        model = self.model
        classes = {}

        def num_classes(spec):
            classes["n"] = _num_classes(model.network, spec)
            return classes["n"]

        # Each fit shuffles arrays in an order of its own (it starts at another step).
        seed = model.seed + int(model.optimizer.iterations.numpy())
        data = data_lib.training_data(
            x, y, batch_size, shuffle, seed, num_classes, sample_weight, class_weight
        )
        if not self._outputs_checked:
            _check_outputs_are_logits(model.network, data.first_images, model.distribute_strategy)
            self._outputs_checked = True
        self.prepare(data, (x, y, sample_weight, class_weight), classes["n"])
        return data

    def prepare(self, data: data_lib.TrainingData, source: tuple, num_classes: int):
        """The context (and ConAdv's ring) for batches of ``data``'s shape; the ring is
        refilled if ``source`` (the user's x, y and weights) is not what it was filled
        from."""
        model = self.model
        images, labels, *weights = data.dataset.element_spec
        strategy = model.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        _check_activity_regularizers(model.network, strategy)
        global_batch = int(images.shape[0])
        if global_batch % replicas:
            raise ValueError(
                f"the batch of {global_batch} does not split over {replicas} replicas: "
                "make it a multiple of strategy.num_replicas_in_sync"
            )
        previous = () if self._source is None else tuple(ref() for ref in self._source)
        if len(previous) != len(source) or any(a is not b for a, b in zip(previous, source)):
            self.ring_ready = False
        self._source = tuple(_reference(value) for value in source)
        self._data = data
        shapes = (tuple(images.shape[1:]), tuple(labels.shape[1:]))
        if self.context is not None and self.context.global_batch_size == global_batch:
            if self.ring is None or (
                (self.ring.example_shape, self.ring.label_shape) == shapes
                and self.ring.sample_weights == data.weighted
            ):
                return
        with strategy.scope():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            if model.method == steps_lib.CONADV:
                self.ring = RingBuffer(
                    strategy,
                    model.staleness,
                    global_batch // replicas,
                    shapes[0],
                    dtype=model.network.compute_dtype,
                    label_shape=shapes[1],
                    label_dtype=labels.dtype,
                    clean_images=model.attack_source == steps_lib.SEPARATE_ATTACK,
                    sample_weights=data.weighted,
                )
                self.ring_ready = False
        self.context = steps_lib.StepContext(
            model=model.network,
            optimizer=model.optimizer,
            global_batch_size=global_batch,
            num_classes=num_classes,
            label_smoothing=model.label_smoothing,
            attack=model.attack_config,
            seed=model.seed,
            ring=self.ring,
            update_pass=model.update_pass,
            compute_dtype=tf.as_dtype(model.network.compute_dtype),
            attack_source=model.attack_source,
        )
        self.replica_step = steps_lib.build_step(model.method, self.context)
        self._prologue = None
        model.train_function = None

    def release_data(self):
        """Drops the reference to the training data once ``fit`` ends."""
        self._data = None

    def fill_ring(self, iterator):
        """The first ``staleness`` batches, attacked with the current weights, into the ring:
        those of a fresh pass over the data, or, for a stream read once, the next ones of
        ``iterator`` (the training stream).

        Batch i of the fill is stream position t + i for the optimizer's step t,
        so it takes the slot and the attack seed step t + i would read.
        """
        model = self.model
        strategy = model.distribute_strategy
        if self._prologue is None:
            self._prologue = tf.function(
                steps_lib.build_conadv_prologue(self.context), jit_compile=bool(model.jit_compile)
            )
        first = int(model.optimizer.iterations.numpy())
        staleness = self.ring.staleness
        if self._data.fill is None:
            batches = _next_batches(iterator, staleness)
        else:
            batches = strategy.experimental_distribute_dataset(self._data.fill(staleness))
        count = 0
        for batch in batches:
            strategy.run(self._prologue, args=(batch, tf.constant(first + count, tf.int64)))
            count += 1
        if count < staleness:
            raise ValueError(
                f"ConAdv with staleness {staleness} fills its ring from the first "
                f"{staleness} batches, but the training data has only {count}"
            )
        self.ring.mark_filled()
        self.ring_ready = True

    def train_function(self):
        """Keras' ``train_function``: the ring filled if it must be, then up to
        ``steps_per_execution`` steps; ``StopIteration`` when the epoch's data has ended."""
        model = self.model
        strategy = model.distribute_strategy
        replica_step = model.train_step
        if model.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)
        steps = int(model.steps_per_execution)

        @tf.function
        def run_steps(iterator):
            def step(count, batch):
                strategy.run(replica_step, args=(batch.get_value(),))
                count += 1
                # Take the next batch only for a step that will run.
                batch = tf.cond(count < steps, iterator.get_next_as_optional, lambda: batch)
                return count, batch

            count, _ = tf.while_loop(
                lambda count, batch: tf.logical_and(count < steps, batch.has_value()),
                step,
                (tf.constant(0), iterator.get_next_as_optional()),
            )
            # Cross-replica reads of the metrics: sums over every replica.
            results = {}
            for metric in model.metrics:
                value = metric.result()
                results.update(value if isinstance(value, dict) else {metric.name: value})
            return results, count

        def train_function(iterator):
            if self.ring is not None and not self.ring_ready:
                self.fill_ring(iterator)
            logs, count = run_steps(iterator)
            if int(count) == 0:
                raise StopIteration
            return logs

        return train_function
