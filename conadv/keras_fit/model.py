"""``ConAdvModel``: vanilla, DisAdv or ConAdv training of any Keras image model with ``fit``.

The wrapper holds a split-BatchNorm copy of the user's model and trains it
with the very step functions ``main.py`` runs (``conadv/steps.py``): the
same attack, the same per-replica ring buffer, the same loss and the same
seeds. Only the loop around them is Keras' (``fit_state.py``). With
``method="vanilla"`` it trains as Keras' own ``fit`` trains the same model
with ``SparseCategoricalCrossentropy(from_logits=True)`` (or
``CategoricalCrossentropy`` on one-hot labels): the same steps, weights,
History and callback logs.

What Keras users pass is taken as Keras takes it (``inputs.py``,
``data.py``): arrays (with ``validation_split``), a dataset batched without
``drop_remainder``, a ``PyDataset`` or a generator (the last partial batch of
an epoch is skipped, with one warning: the ring has one batch shape),
``sample_weight`` and ``class_weight`` (each example's clean and adversarial
cross-entropy weighted, as Keras weights a loss; ConAdv's ring keeps the
weights with their batch), labels
as class ids (B,) or (B, 1) or one-hot (B, C), a model that ends in a
softmax (trained on its logits; ``predict`` and ``export_model`` give the
softmax back), and regularizers (``model.losses``, in both the clean and
the adversarial objective, ``official/model_losses.py``).

Logs: ``loss`` (the method's objective, per example: ½·(CE_clean + CE_adv)
for the adversarial methods, plus ``model.losses``), ``clean_loss``,
``adv_loss`` (the cross-entropies) and the compiled metrics on the clean
batch trained on, each an exact mean over the examples of every replica
since the epoch began. ``evaluate`` reports Keras' own loss of the main
branch: no label smoothing, so with ``label_smoothing`` > 0 the training
``loss`` and ``val_loss`` are different functions.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.keras_fit import batch_norm_callbacks, inputs
from conadv.keras_fit import data as data_lib
from conadv.keras_fit.fit_state import FitState
from official.model_conversion import (
    logits_model,
    plain_model,
    split_batch_norm,
    with_output_softmax,
)
from official.model_losses import additional_loss
from official.precise_bn import PreciseBatchNorm
from official.split_batch_norm import call_model, split_layers

METHODS = steps_lib.METHODS


def _split_network(model: keras.Model) -> tuple[keras.Model, dict | None]:
    """The network ConAdv trains (logits, split BatchNorm) and the final softmax it took off.

    A model without BatchNorm keeps every weight shared by clean and
    adversarial images (a warning says so); one with split BatchNorm (a
    ResNet of ``official/resnet.py``) is used as it is.
    """
    logits, final_softmax = logits_model(model)
    if any(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in logits._flatten_layers(include_self=False)
    ):
        return split_batch_norm(logits), final_softmax
    if not split_layers(logits):
        warnings.warn(
            f"model {model.name!r} has no BatchNormalization: clean and adversarial "
            "images share every weight (there is no split BatchNorm to separate them)",
            stacklevel=3,
        )
    return logits, final_softmax


def _attack_config(source, eps, steps, step_size, random_init, input_range):
    """The attack of ``ConAdvModel``'s arguments: by default from a random start; the
    free attack (``attack_source="clean_pass"``, ``conadv/free_attack.py``) is 1 step from
    the clean image through the main BatchNorm, and refuses other settings."""
    if source not in steps_lib.ATTACK_SOURCES:
        raise ValueError(
            f"attack_source={source!r} is unknown; choose one of "
            f"{', '.join(steps_lib.ATTACK_SOURCES)}"
        )
    free = source == steps_lib.CLEAN_PASS
    if free and (int(steps) != 1 or random_init):
        raise ValueError(
            "attack_source='clean_pass' is a 1-step attack from the clean image: "
            "leave attack_steps at 1 and attack_random_init unset (or False)"
        )
    attack = attack_lib.AttackConfig(
        float(eps),
        step_size,
        int(steps),
        True if random_init is None else bool(random_init),
        input_min=float(input_range[0]),
        input_max=float(input_range[1]),
    )
    return attack.from_clean_pass() if free else attack


@keras.saving.register_keras_serializable(package="conadv")
class ConAdvModel(keras.Model):
    """A Keras model that trains ``model`` with vanilla, DisAdv or ConAdv steps.

    ``model``: a functional or Sequential image classifier with one output,
    logits or a softmax (keras.applications' default head). Its BatchNorm
    layers are made split BatchNorms (``_split_network``). ``attack_eps`` and
    ``attack_step_size`` are in the units of the model's input, and
    ``input_range`` is the range of a valid input (``_attack_config``). The other
    arguments are ``main.py``'s flags of the same names.
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
        attack_random_init: bool | None = None,
        seed: int = 0,
        update_pass: str = steps_lib.CONCATENATED,
        attack_source: str = steps_lib.SEPARATE_ATTACK,
        name: str | None = None,
        **kwargs,
    ):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
        if int(staleness) < 1:
            raise ValueError(f"staleness must be >= 1, got {staleness}")
        self.network, self._final_softmax = _split_network(model)
        super().__init__(name=name or f"{method}_{model.name}", **kwargs)
        self.method, self.staleness, self.seed = method, int(staleness), int(seed)
        self.label_smoothing, self.update_pass = float(label_smoothing), update_pass
        self.attack_source = attack_source
        self.attack_config = _attack_config(
            attack_source,
            attack_eps,
            attack_steps,
            attack_step_size,
            attack_random_init,
            input_range,
        )
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.adv_loss_tracker = None
        if method != steps_lib.VANILLA:
            self.adv_loss_tracker = keras.metrics.Mean(name="adv_loss")
        self._evaluating = False
        self._fit = FitState(self)
        self.built = True

    # ------------------------------------------------------------ saving

    def get_config(self) -> dict:
        config = self.attack_config
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.network),
            "final_layer": self._final_softmax,  # what the user's model ended in
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
            "attack_source": self.attack_source,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("model"))
        return cls(with_output_softmax(network, config.pop("final_layer", None)), **config)

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
        if self._evaluating:  # clean_loss and adv_loss describe training batches only
            train_only = (self.clean_loss_tracker, self.adv_loss_tracker)
            metrics = [m for m in metrics if all(m is not t for t in train_only)]
        return metrics

    def test_step(self, data):
        """Keras' own evaluation of the main branch: cross-entropy from the logits (no label
        smoothing; categorical for one-hot labels), weighted by any sample weights, plus
        ``model.losses``, and the compiled metrics on the model's outputs."""
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = call_model(self.network, images, False, "main")
        loss = data_lib.keras_loss(labels, logits, sample_weight)
        extra = additional_loss(self.network, {"main": 1.0})
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
        self._fit = FitState(self)
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
        """As ``keras.Model.fit`` (inputs as ``inputs.py`` reads them), on batches of one
        size: arrays are shuffled each epoch and each ``fit`` anew; batches of another
        size than the first (a last partial batch) are skipped, with one warning."""
        if not self.compiled:
            raise ValueError("compile the ConAdvModel (an optimizer, metrics) before fit")
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = inputs.validation_split(
                x, y, sample_weight, validation_split
            )
        data = self._fit.begin(x, y, batch_size, shuffle, sample_weight, class_weight)
        callbacks = list(callbacks or [])
        callbacks.append(batch_norm_callbacks.InitialStatisticsWarning())
        if data.skipped is not None:
            callbacks.append(data_lib.SkipReporter(data.skipped, data.batch_size))
        if data.py_dataset is not None:
            callbacks.append(inputs.EpochHooks(data.py_dataset))
        kwargs.setdefault("validation_batch_size", batch_size)
        try:
            with warnings.catch_warnings():
                if data.skipped is not None and kwargs.get("steps_per_epoch") is None:
                    # Skipping batches hides the dataset's length from Keras, which then
                    # warns at each epoch's end that the data "ran out": it did not.
                    warnings.filterwarnings("ignore", message="Your input ran out of data")
                return super().fit(
                    data.dataset,
                    epochs=epochs,
                    verbose=verbose,
                    callbacks=callbacks,
                    validation_data=validation_data,
                    shuffle=False,
                    **kwargs,
                )
        finally:
            self._fit.release_data()

    def train_on_batch(self, *args, **kwargs):
        raise NotImplementedError(
            "ConAdvModel trains with fit: ConAdv's ring buffer follows a stream of batches"
        )

    def train_step(self, data):
        """One replica's step on its part of the batch (inside ``strategy.run``)."""
        result = self._fit.replica_step(data)
        clean = result.clean_losses  # weighted, with example weights
        self.clean_loss_tracker.update_state(clean)
        objective = clean
        if self.adv_loss_tracker is not None:
            self.adv_loss_tracker.update_state(result.adv_losses)
            objective = 0.5 * (clean + result.adv_losses)
        # As Keras' fit: the batch's (weighted) loss summed over its examples and divided
        # by their count, plus model.losses; the epoch's mean weights each batch by its size.
        loss = tf.reduce_mean(objective)
        if result.extra_loss is not None:
            loss += result.extra_loss
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(clean)[0])
        if self._compile_metrics is not None:
            self._compile_metrics.update_state(
                result.labels, self._outputs(result.clean_logits), result.sample_weight
            )

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self._fit.train_function()
        return self.train_function

    def load_weights(self, *args, **kwargs):
        """As ``keras.Model.load_weights``; the ring (not saved) is refilled at the next step."""
        result = super().load_weights(*args, **kwargs)
        self._fit.mark_for_refill()
        return result

    def set_weights(self, weights):
        """As ``keras.Model.set_weights``; the ring is refilled at the next step."""
        super().set_weights(weights)
        self._fit.mark_for_refill()

    # ------------------------------------------------------- after training

    def precise_bn(self, dataset: tf.data.Dataset, batches: int):
        """Replaces the main branch's moving statistics by population statistics.

        Runs ``batches`` batches of ``dataset`` (``(images, labels)``) through the
        network in training mode, as ``main.py --precise_bn_batches`` does
        (``official/precise_bn.py``), and keeps the result: evaluation,
        prediction and ``export_model`` then use it. Pass the training images
        *without* augmentation (as evaluation sees them). Frozen BatchNorms
        keep their statistics; one the model calls several times gets those
        of all its calls. Returns the statistics.
        """
        strategy = self.distribute_strategy
        precise = PreciseBatchNorm(self.network, strategy)
        statistics = precise.compute(strategy.experimental_distribute_dataset(dataset), batches)
        precise.assign(statistics)
        return statistics

    def export_model(self) -> keras.Model:
        """The trained network as a plain Keras model with the outputs of the model passed in
        (its final softmax included): ordinary BatchNormalization layers holding the main
        branch, loadable with ``keras.models.load_model`` alone."""
        return with_output_softmax(plain_model(self.network), self._final_softmax)
