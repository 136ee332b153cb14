"""``ConAdvModel``: vanilla, DisAdv or ConAdv training of any Keras image model with ``fit``.

The wrapper holds a split-BatchNorm copy of the user's model and trains it
with the very step functions ``main.py`` runs (``conadv/steps.py``): the
same attack, the same per-replica ring buffer, the same loss and the same
seeds. Only the loop around them is Keras': ``fit`` calls
``train_function``, which runs ``steps_per_execution`` replica steps in one
``tf.function`` with a plain ``tf.range`` loop around ``strategy.run`` (Keras'
own loop puts the step under a ``tf.cond``, where the optimizer's
cross-replica ``merge_call`` fails under MirroredStrategy).

ConAdv's ring needs fixed batches and is filled before the first step: the
first ``staleness`` batches of a separate pass over the training data,
attacked with the current weights. Each epoch then has as many optimizer
steps as batches; step t trains on the ring's slot t mod τ (a batch attacked
τ steps earlier) and attacks the batch it takes from the epoch into that
slot. The ring is state of the run, not of the model: it is neither saved
by ``save_weights`` nor restored by ``keras.callbacks.BackupAndRestore``,
and it is refilled, from the restored weights, whenever weights are loaded.

Logs: ``loss`` (the method's objective, per example: ½·(CE_clean + CE_adv)
for the adversarial methods), ``clean_loss``, ``adv_loss`` and the compiled
metrics on the clean batch trained on, each an exact mean over the examples
of every replica since the epoch began.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.keras_conversion import ConversionError, plain_model, split_batch_norm
from conadv.ring_buffer import RingBuffer
from official import losses
from official.precise_bn import PreciseBatchNorm
from official.split_batch_norm import SplitBatchNormalization

METHODS = steps_lib.METHODS


def _batch_norms(model, kind) -> list:
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, kind)]


def _ends_in_softmax(model) -> bool:
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == (
        "softmax"
    )


class ConAdvModel(keras.Model):
    """A Keras model that trains ``model`` with vanilla, DisAdv or ConAdv steps.

    ``model``: a functional or Sequential image classifier that outputs
    logits (build keras.applications with ``classifier_activation=None``);
    its BatchNorm layers are made split BatchNorms (``split_batch_norm``). A
    model without BatchNorm trains with every weight shared by clean and
    adversarial images (a warning says so); a model that already has split
    BatchNorm (a ResNet of ``official/resnet.py``) is used as it is.
    ``attack_eps`` and ``attack_step_size`` are in the units of the model's
    input, and ``input_range`` is the range of a valid input (adversarial
    images are clipped to it); ``attack_random_init=False`` starts the attack
    at the clean image (the paper starts at a random point of the ε-ball).
    Labels are class ids. The other arguments are ``main.py``'s flags of the
    same names.
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
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        if int(staleness) < 1:
            raise ValueError(f"staleness must be >= 1, got {staleness}")
        if _ends_in_softmax(model):
            raise ConversionError(
                f"model {model.name!r} ends in a softmax; ConAdv's loss takes logits: build it "
                "without the final activation (keras.applications: classifier_activation=None)"
            )
        super().__init__(name=name or f"{method}_{model.name}")
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
        if _batch_norms(model, keras.layers.BatchNormalization):
            self.network = split_batch_norm(model)
        else:
            if not _batch_norms(model, SplitBatchNormalization):
                warnings.warn(
                    f"model {model.name!r} has no BatchNormalization: clean and adversarial "
                    "images share every weight (there is no split BatchNorm to separate them)",
                    stacklevel=2,
                )
            self.network = model
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.adv_loss_tracker = None
        if method != steps_lib.VANILLA:
            self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
        self._evaluating = False
        self._ring: RingBuffer | None = None
        # A host-side flag, not ring.is_filled(): reading that variable before every
        # call of the train function would make the host wait for the device.
        self._ring_ready = False
        self._context: steps_lib.StepContext | None = None
        self._replica_step = None
        self._fill_dataset = None
        self.built = True

    # ------------------------------------------------------------ inference

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

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
        images, labels = data[0], data[1]
        logits = self(images, training=False)
        self._loss_tracker.update_state(losses.cross_entropy(labels, logits, self.label_smoothing))
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(labels, logits)
        return self._metric_results()

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

    def fit(self, x=None, y=None, batch_size=None, shuffle=True, **kwargs):
        """As ``keras.Model.fit``; the batches must all have one size.

        ``x`` is a ``tf.data.Dataset`` of ``(images, labels)`` batched with
        ``drop_remainder=True``, or arrays with ``y`` and ``batch_size``
        (default 32; a last partial batch is dropped). ConAdv fills its ring
        from the first ``staleness`` batches before the first step.
        """
        if "validation_split" in kwargs:
            raise ValueError(
                "ConAdvModel.fit takes validation_data, not validation_split: "
                "split the arrays first"
            )
        if isinstance(x, tf.data.Dataset):
            if y is not None or batch_size is not None:
                raise ValueError("fit(dataset): give y and batch_size in the dataset, not here")
            dataset = x
        else:
            if y is None:
                raise ValueError(
                    "fit(images, labels, batch_size=...): the labels (class ids) are missing"
                )
            dataset = tf.data.Dataset.from_tensor_slices((x, y))
            if shuffle:
                dataset = dataset.shuffle(len(y), seed=self.seed, reshuffle_each_iteration=True)
            dataset = dataset.batch(batch_size or 32, drop_remainder=True)
        self._prepare(dataset)
        return super().fit(dataset, shuffle=False, **kwargs)

    def _prepare(self, dataset: tf.data.Dataset):
        """The step context (and ConAdv's ring) for batches of ``dataset``'s shape."""
        if not self.compiled:
            raise ValueError("compile the ConAdvModel (an optimizer, metrics) before fit")
        spec = dataset.element_spec[0]
        strategy = self.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        global_batch = spec.shape[0]
        if global_batch is None or not spec.shape[1:].is_fully_defined():
            raise ValueError(
                "ConAdvModel.fit needs batches of one known shape (the ring's slots and the "
                "loss's divisor are fixed): batch the dataset with drop_remainder=True, "
                f"got image batches of shape {spec.shape}"
            )
        if global_batch % replicas:
            raise ValueError(
                f"the batch of {global_batch} does not split over {replicas} replicas: "
                "make it a multiple of strategy.num_replicas_in_sync"
            )
        example_shape = tuple(int(d) for d in spec.shape[1:])
        self._fill_dataset = dataset
        if self._context is not None and self._context.global_batch_size == global_batch:
            if self._ring is None or self._ring.example_shape == example_shape:
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
                )
                self._ring_ready = False
        outputs = self.network.output_shape
        self._context = steps_lib.StepContext(
            model=self.network,
            optimizer=self.optimizer,
            global_batch_size=int(global_batch),
            num_classes=int(outputs[-1]) if outputs and outputs[-1] else 0,
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
        if len(data) != 2:
            raise ValueError(
                "ConAdvModel trains on (images, labels) batches; sample weights are not supported"
            )
        result = self._replica_step((data[0], data[1]))
        clean = result.clean_losses
        self.clean_loss_tracker.update_state(clean)
        objective = clean
        if self.adv_loss_tracker is not None:
            self.adv_loss_tracker.update_state(result.adv_losses)
            objective = 0.5 * (clean + result.adv_losses)
        self._loss_tracker.update_state(objective)
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(result.labels, result.clean_logits)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        strategy = self.distribute_strategy
        replica_step = self.train_step
        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def run_steps(iterator):
            for _ in tf.range(int(self.steps_per_execution)):
                strategy.run(replica_step, args=(next(iterator),))
            # Cross-replica reads of the metrics: sums over every replica.
            return self._metric_results()

        def train_function(iterator):
            if self._ring is not None and not self._ring_ready:
                self._fill_ring()
            return run_steps(iterator)

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
        prediction and ``export_model`` then use it. Returns the statistics.
        """
        strategy = self.distribute_strategy
        precise = PreciseBatchNorm(self.network, strategy)
        statistics = precise.compute(strategy.experimental_distribute_dataset(dataset), batches)
        for layer, mean, variance in zip(precise.layers, statistics.means, statistics.variances):
            layer.main_moving_mean.assign(mean)
            layer.main_moving_variance.assign(variance)
        return statistics

    def export_model(self) -> keras.Model:
        """The trained network as a plain Keras model: ordinary BatchNormalization layers
        holding the main branch, loadable with ``keras.models.load_model`` alone."""
        return plain_model(self.network)
