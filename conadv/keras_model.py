"""``ConAdvModel``: vanilla, DisAdv or ConAdv training of any Keras image model with ``fit``.

The wrapper holds a split-BatchNorm copy of the user's model and trains it
with the very step functions ``main.py`` runs (``conadv/steps.py``): the
same attack, the same per-replica ring buffer, the same loss and the same
seeds. Only the loop around them is Keras': ``fit`` calls
``train_function``, which runs up to ``steps_per_execution`` replica steps in
one ``tf.function``: a ``tf.while_loop`` that stops when the epoch's data
ends, with ``strategy.run`` in its body (Keras' own loop puts the step under
a ``tf.cond``, where the optimizer's cross-replica ``merge_call`` fails under
MirroredStrategy). With ``method="vanilla"`` it trains as Keras' own ``fit``
trains the same model with ``SparseCategoricalCrossentropy(from_logits=True)``
(or ``CategoricalCrossentropy`` on one-hot labels): the same steps, weights,
History and callback logs.

What Keras users pass is taken as Keras takes it (``conadv/keras_data.py``):
a dataset batched without ``drop_remainder`` or arrays (the last partial
batch of an epoch is skipped, with one warning: the ring has one batch
shape), labels as class ids (B,) or (B, 1) or one-hot (B, C), a model that
ends in a softmax (trained on its logits; ``predict`` and ``export_model``
give the softmax back), and regularizers (``model.losses``, in both the
clean and the adversarial objective, ``official/model_losses.py``).

ConAdv's ring is filled before the first step of a ``fit`` on new data: the
first ``staleness`` batches of a separate pass over it, attacked with the
current weights. Each epoch then has as many optimizer steps as batches;
step t trains on the ring's slot t mod τ (a batch attacked τ steps earlier)
and attacks the batch it takes from the epoch into that slot. A further
``fit`` on the same data continues that stream; on other data, or after
weights are loaded (``keras.callbacks.BackupAndRestore``), the ring is
refilled. The ring is state of the run, not of the model: ``save`` and
``save_weights`` keep the weights of both branches and the optimizer.

Logs: ``loss`` (the method's objective, per example: ½·(CE_clean + CE_adv)
for the adversarial methods, plus ``model.losses``), ``clean_loss``,
``adv_loss`` (the cross-entropies) and the compiled metrics on the clean
batch trained on, each an exact mean over the examples of every replica
since the epoch began.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import keras_data
from conadv import steps as steps_lib
from conadv.keras_conversion import (
    ConversionError,
    logits_model,
    plain_model,
    split_batch_norm,
    with_output_softmax,
)
from conadv.ring_buffer import RingBuffer
from official.model_losses import additional_loss
from official.precise_bn import PreciseBatchNorm
from official.split_batch_norm import SplitBatchNormalization, call_model

METHODS = steps_lib.METHODS


def _batch_norms(model, kind) -> list:
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


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


@keras.saving.register_keras_serializable(package="conadv")
class ConAdvModel(keras.Model):
    """A Keras model that trains ``model`` with vanilla, DisAdv or ConAdv steps.

    ``model``: a functional or Sequential image classifier with one output,
    logits or a softmax (keras.applications' default head) — a softmax is
    taken off for training and given back by ``predict`` and
    ``export_model``. Its BatchNorm layers are made split BatchNorms
    (``split_batch_norm``). A model without BatchNorm trains with every
    weight shared by clean and adversarial images (a warning says so); a
    model that already has split BatchNorm (a ResNet of
    ``official/resnet.py``) is used as it is. ``attack_eps`` and
    ``attack_step_size`` are in the units of the model's input, and
    ``input_range`` is the range of a valid input (adversarial images are
    clipped to it); ``attack_random_init=False`` starts the attack at the
    clean image (the paper starts at a random point of the ε-ball). The
    other arguments are ``main.py``'s flags of the same names.
    """

    def __init__(
        self,
        model: keras.Model,
        method: str = steps_lib.CONADV,
        staleness: int = 1,
        attack_eps: float = 4.0,
        attack_steps: int = 1,
        attack_step_size: float | None = None,
        input_range: tuple[float, float] = (0.0, 255.0),
        label_smoothing: float = 0.1,
        *,
        attack_random_init: bool = True,
        seed: int = 0,
        update_pass: str = steps_lib.CONCATENATED,
        name: str | None = None,
        **kwargs,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        if int(staleness) < 1:
            raise ValueError(f"staleness must be >= 1, got {staleness}")
        logits, self._final_softmax = logits_model(model)
        super().__init__(name=name or f"{method}_{model.name}", **kwargs)
        self.method = method
        self.staleness = int(staleness)
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self.update_pass = update_pass
        low, high = (float(v) for v in input_range)
        self.attack_config = attack_lib.AttackConfig(
            eps=float(attack_eps),
            step_size=attack_step_size,
            num_steps=int(attack_steps),
            random_init=bool(attack_random_init),
            input_min=low,
            input_max=high,
        )
        if _batch_norms(logits, keras.layers.BatchNormalization):
            self.network = split_batch_norm(logits)
        else:
            if not _batch_norms(logits, SplitBatchNormalization):
                warnings.warn(
                    f"model {model.name!r} has no BatchNormalization: clean and adversarial "
                    "images share every weight (there is no split BatchNorm to separate them)",
                    stacklevel=2,
                )
            self.network = logits
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.adv_loss_tracker = None
        if method != steps_lib.VANILLA:
            self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
        self._evaluating = False
        self._ring: RingBuffer | None = None
        # A host-side flag, not ring.is_filled(): reading that variable before every
        # call of the train function would make the host wait for the device.
        self._ring_ready = False
        #: What the ring was filled from (the user's x and y): other data refills it.
        self._ring_source = None
        self._context: steps_lib.StepContext | None = None
        self._replica_step = None
        self._fill_dataset = None
        self.built = True

    # ------------------------------------------------------------ saving

    def get_config(self) -> dict:
        config = self.attack_config
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(
                with_output_softmax(self.network, self._final_softmax)
            ),
            "method": self.method,
            "staleness": self.staleness,
            "attack_eps": config.eps,
            "attack_steps": config.num_steps,
            "attack_step_size": config.step_size,
            "input_range": [config.input_min, config.input_max],
            "label_smoothing": self.label_smoothing,
            "attack_random_init": config.random_init,
            "seed": self.seed,
            "update_pass": self.update_pass,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)

    def compile_from_config(self, config: dict):
        """Compiles a loaded model as it was saved (Keras does not call an overridden
        ``compile`` by itself)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------ inference

    def _outputs(self, logits):
        """What the user's model outputs: the logits, or their softmax if it ended in one."""
        if self._final_softmax is None:
            return logits
        return keras.activations.softmax(logits, axis=-1)

    def call(self, inputs, training=None):
        return self._outputs(self.network(inputs, training=training))

    @property
    def metrics(self):
        metrics = super().metrics
        if self._evaluating:
            # clean_loss and adv_loss describe training batches only.
            train_only = (self.clean_loss_tracker, self.adv_loss_tracker)
            metrics = [m for m in metrics if all(m is not t for t in train_only)]
        return metrics

    def _metric_results(self) -> dict:
        results = {}
        for metric in self.metrics:
            value = metric.result()
            if isinstance(value, dict):
                results.update(value)
            else:
                results[metric.name] = value
        return results

    def test_step(self, data):
        """Keras' own evaluation of the main branch: cross-entropy from the logits (no label
        smoothing; categorical for one-hot labels), weighted by any sample weights, plus
        ``model.losses``, and the compiled metrics on the model's outputs."""
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = call_model(self.network, images, False, "main")
        extra = additional_loss(self.network, {"main": 1.0})
        if labels.shape.rank == logits.shape.rank and labels.shape[-1] != 1:
            loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        else:
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        loss = tf.reduce_mean(loss_fn(labels, logits, sample_weight=sample_weight))
        if extra is not None:
            loss += extra
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(logits)[0])
        return self.compute_metrics(images, labels, self._outputs(logits), sample_weight)

    def evaluate(self, *args, **kwargs):
        evaluating, self._evaluating = self._evaluating, True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = evaluating

    # ------------------------------------------------------------- training

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """As ``keras.Model.compile``, without ``loss``: the method defines it."""
        if loss is not None:
            raise ValueError(
                "ConAdvModel trains on its method's loss (cross-entropy with label smoothing, "
                "½·(clean + adversarial) for DisAdv and ConAdv): compile it without loss="
            )
        super().compile(optimizer=optimizer, **kwargs)
        self._context = None
        self.train_function = None

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        **kwargs,
    ):
        """As ``keras.Model.fit``, on batches of one size.

        ``x`` is a ``tf.data.Dataset`` of ``(images, labels)`` batches, or arrays
        with ``y`` and ``batch_size`` (default 32). Batches of another size than
        the first (a last partial batch) are skipped, with one warning. ConAdv
        fills its ring from the first ``staleness`` batches before the first
        step on new data. Examples are not weighted: ``class_weight`` and
        ``sample_weight`` are refused.
        """
        if validation_split:
            raise ValueError(
                "ConAdvModel.fit takes validation_data, not validation_split: "
                "split the arrays first"
            )
        if class_weight is not None or sample_weight is not None:
            raise ValueError(
                "ConAdvModel.fit does not weight examples (class_weight, sample_weight): "
                "ConAdv's clean and adversarial terms are plain means; resample the data instead"
            )
        if not self.compiled:
            raise ValueError("compile the ConAdvModel (an optimizer, metrics) before fit")
        data = keras_data.training_data(
            x, y, batch_size, shuffle, self.seed, lambda spec: _num_classes(self.network, spec)
        )
        self._check_outputs_are_logits(data.dataset)
        self._prepare(data.dataset, source=(x, y))
        callbacks = list(callbacks or [])
        if data.skipped is not None:
            callbacks.append(keras_data.SkipReporter(data.skipped, data.batch_size))
        with warnings.catch_warnings():
            if data.skipped is not None and kwargs.get("steps_per_epoch") is None:
                # Skipping batches leaves the dataset's length unknown to Keras, which
                # then warns at each epoch's end that the data "ran out": it did not.
                warnings.filterwarnings("ignore", message="Your input ran out of data")
            return super().fit(
                data.dataset,
                epochs=epochs,
                verbose=verbose,
                callbacks=callbacks,
                validation_data=validation_data,
                validation_batch_size=kwargs.pop("validation_batch_size", None) or batch_size,
                shuffle=False,
                **kwargs,
            )

    def _check_outputs_are_logits(self, dataset: tf.data.Dataset):
        """Refuses a network whose outputs on the first batch are probabilities (every row
        non-negative, summing to 1): a softmax ``logits_model`` could not see (inside a
        custom or Lambda layer) would otherwise be trained as logits, silently."""
        if isinstance(self.distribute_strategy, tf.distribute.TPUStrategy):
            return  # an eager call outside the TPU's replica context cannot read its variables
        images = next(iter(dataset.take(1)))[0][:16]
        outputs = tf.cast(self.network(images, training=False), tf.float32)
        if bool(
            tf.reduce_all(outputs >= 0.0)
            and tf.reduce_all(tf.abs(tf.reduce_sum(outputs, axis=-1) - 1.0) < 1e-4)
        ):
            raise ConversionError(
                f"the outputs of model {self.network.name!r} are probabilities (each row sums "
                "to 1) from a softmax ConAdvModel cannot take off: end the model in "
                "Dense(activation='softmax') or keras.layers.Softmax, or output the logits"
            )

    def _prepare(self, dataset: tf.data.Dataset, source=None):
        """The step context (and ConAdv's ring) for batches of ``dataset``'s shape."""
        images, labels = dataset.element_spec
        strategy = self.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        global_batch = int(images.shape[0])
        if global_batch % replicas:
            raise ValueError(
                f"the batch of {global_batch} does not split over {replicas} replicas: "
                "make it a multiple of strategy.num_replicas_in_sync"
            )
        if (
            source is None
            or self._ring_source is None
            or any(a is not b for a, b in zip(source, self._ring_source))
        ):
            self._ring_ready = False
        self._ring_source = source
        self._fill_dataset = dataset
        example_shape = tuple(int(d) for d in images.shape[1:])
        label_shape = tuple(int(d) for d in labels.shape[1:])
        context = self._context
        if (
            context is not None
            and context.global_batch_size == global_batch
            and (
                self._ring is None
                or (self._ring.example_shape, self._ring.label_shape)
                == (example_shape, label_shape)
            )
        ):
            return
        with strategy.scope():
            if not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)
            if self.method == steps_lib.CONADV:
                self._ring = RingBuffer(
                    strategy,
                    self.staleness,
                    global_batch // replicas,
                    example_shape,
                    dtype=self.network.compute_dtype,
                    label_shape=label_shape,
                    label_dtype=labels.dtype,
                )
                self._ring_ready = False
        self._context = steps_lib.StepContext(
            model=self.network,
            optimizer=self.optimizer,
            global_batch_size=global_batch,
            num_classes=_num_classes(self.network, images),
            label_smoothing=self.label_smoothing,
            attack=self.attack_config,
            seed=self.seed,
            ring=self._ring,
            update_pass=self.update_pass,
            compute_dtype=tf.as_dtype(self.network.compute_dtype),
        )
        self._replica_step = steps_lib.build_step(self.method, self._context)
        self.train_function = None

    def train_on_batch(self, *args, **kwargs):
        raise NotImplementedError(
            "ConAdvModel trains with fit: ConAdv's ring buffer follows a stream of batches"
        )

    def train_step(self, data):
        """One replica's step on its part of the batch (inside ``strategy.run``)."""
        result = self._replica_step(data)
        clean = result.clean_losses
        self.clean_loss_tracker.update_state(clean)
        objective = clean
        if self.adv_loss_tracker is not None:
            self.adv_loss_tracker.update_state(result.adv_losses)
            objective = 0.5 * (clean + result.adv_losses)
        # As Keras' fit: the batch's mean loss plus model.losses, weighted by the batch.
        loss = tf.reduce_mean(objective)
        if result.extra_loss is not None:
            loss += result.extra_loss
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(clean)[0])
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(result.labels, self._outputs(result.clean_logits))

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        strategy = self.distribute_strategy
        replica_step = self.train_step
        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)
        steps = int(self.steps_per_execution)

        @tf.function
        def run_steps(iterator):
            """Up to ``steps`` steps, fewer where the epoch's data ends; returns the
            metrics and the number of steps run."""

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
            return self._metric_results(), count

        def train_function(iterator):
            if self._ring is not None and not self._ring_ready:
                self._fill_ring()
            logs, count = run_steps(iterator)
            if int(count) == 0:
                raise StopIteration
            return logs

        self.train_function = train_function
        return train_function

    def _fill_ring(self):
        """The first ``staleness`` batches, attacked with the current weights, into the ring.

        Batch i of the fill is stream position t + i for the optimizer's step t,
        so it takes the slot and the attack seed step t + i would read.
        """
        strategy = self.distribute_strategy
        prologue = tf.function(
            steps_lib.build_conadv_prologue(self._context), jit_compile=bool(self.jit_compile)
        )
        first = int(self.optimizer.iterations.numpy())
        batches = strategy.experimental_distribute_dataset(self._fill_dataset.take(self.staleness))
        count = 0
        for batch in batches:
            strategy.run(prologue, args=(batch, tf.constant(first + count, tf.int64)))
            count += 1
        if count < self.staleness:
            raise ValueError(
                f"ConAdv with staleness {self.staleness} fills its ring from the first "
                f"{self.staleness} batches, but the training data has only {count}"
            )
        self._ring.mark_filled()
        self._ring_ready = True

    def load_weights(self, *args, **kwargs):
        """As ``keras.Model.load_weights``; the ring (not saved) is refilled at the next step."""
        result = super().load_weights(*args, **kwargs)
        self._ring_ready = False
        return result

    # ------------------------------------------------------- after training

    def precise_bn(self, dataset: tf.data.Dataset, batches: int):
        """Replaces the main branch's moving statistics by population statistics.

        Runs ``batches`` batches of ``dataset`` (``(images, labels)``) through the
        network in training mode, as ``main.py --precise_bn_batches`` does
        (``official/precise_bn.py``), and keeps the result: evaluation,
        prediction and ``export_model`` then use it. Pass the training images
        *without* augmentation (as evaluation sees them): the statistics are
        those of the images given. Frozen BatchNorms (``trainable=False``)
        keep their statistics; a BatchNorm the model calls several times gets
        those of all its calls. Returns the statistics.
        """
        strategy = self.distribute_strategy
        precise = PreciseBatchNorm(self.network, strategy)
        statistics = precise.compute(strategy.experimental_distribute_dataset(dataset), batches)
        for layer, mean, variance in zip(precise.layers, statistics.means, statistics.variances):
            layer.main_moving_mean.assign(mean)
            layer.main_moving_variance.assign(variance)
        return statistics

    def export_model(self) -> keras.Model:
        """The trained network as a plain Keras model with the outputs of the model passed in
        (its final softmax included): ordinary BatchNormalization layers holding the main
        branch, loadable with ``keras.models.load_model`` alone."""
        return with_output_softmax(plain_model(self.network), self._final_softmax)
