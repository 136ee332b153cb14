"""BatchNorm with two independent branches (AdvProp's split BatchNorm).

Clean and adversarial images have different statistics; mixing them in one
BatchNorm hurts clean accuracy (Xie et al., 2020). Each layer therefore
keeps a *main* branch (clean images; used for evaluation and export) and an
*auxiliary* branch (adversarial images), each with its own γ, β and moving
statistics. The caller picks the branch per call — or ``"mixed"``: the first
half of the batch through main and the second half through auxiliary, so
one pass over ``[clean; adversarial]`` replaces two passes of half the size —
and whether the moving statistics may update (the attack's forward pass uses
batch statistics but must leave every variable untouched).

Batch statistics are those of a group of replicas (``official/group_moments.py``).
Normalisation and moving statistics are float32 whatever the compute dtype.
A functional model replays the arguments recorded when it was built, so the
branch and the update rule are chosen around a call (``batch_norm_mode``),
and whoever needs the main branch's inputs (precise BatchNorm) observes them
around a call too (``observe_main_inputs``).
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf

from official.group_moments import batch_moments

BRANCHES = ("main", "aux")
MIXED = "mixed"


class _ThreadStack(threading.local):
    """A stack per thread (MirroredStrategy traces each replica in a thread of its own)
    of what the contexts below make active while a forward pass is traced."""

    def __init__(self):
        self.items = []

    @contextlib.contextmanager
    def pushed(self, item):
        self.items.append(item)
        try:
            yield item
        finally:
            self.items.pop()

    def top(self, default=None):
        return self.items[-1] if self.items else default


#: The choices of ``batch_norm_mode``.
_modes = _ThreadStack()

#: The observers of ``observe_main_inputs``.
_observers = _ThreadStack()


@contextlib.contextmanager
def observe_main_inputs(observe):
    """While a forward pass is called or traced, every training-mode call of a split
    BatchNorm passes its main-branch input to ``observe(layer, x)`` (once per call, so a
    layer called twice is observed twice). Per thread, like ``batch_norm_mode``."""
    with _observers.pushed(observe):
        yield


class BatchNormMode:
    """What a split BatchNorm called without ``bn_branch``, ``update_stats`` or
    ``group_statistics`` uses for them (see ``batch_norm_mode``)."""

    def __init__(self, bn_branch: str = "main", update_stats: bool = True, group_statistics=True):
        self.bn_branch = check_branch(bn_branch)
        self.update_stats = bool(update_stats)
        self.group_statistics = bool(group_statistics)


@contextlib.contextmanager
def batch_norm_mode(bn_branch: str = "main", update_stats: bool = True, group_statistics=True):
    """Chooses, while a model is called or traced, the branch and the update rule of every
    split BatchNorm it calls without its own ``bn_branch`` / ``update_stats`` /
    ``group_statistics`` arguments.

    A functional Keras model calls its layers with the arguments recorded when
    it was built, so these choices cannot travel through its call; the layers
    read them from this context instead (explicit arguments still win). It is
    per thread, as MirroredStrategy traces each replica in a thread of its own:
    enter it inside the replica function.
    """
    with _modes.pushed(BatchNormMode(bn_branch, update_stats, group_statistics)) as mode:
        yield mode


def call_model(
    model, inputs, training, bn_branch: str = "main", update_stats=True, group_statistics=True
):
    """``model(inputs, training=training)`` inside ``batch_norm_mode(bn_branch, update_stats,
    group_statistics)``: how the steps, the attack and precise BatchNorm call any model with
    split BatchNorm (a ResNet of ``official/resnet.py``, a converted Keras model)."""
    with batch_norm_mode(bn_branch, update_stats, group_statistics):
        return model(inputs, training=training)


def current_mode() -> BatchNormMode:
    """The innermost ``batch_norm_mode`` of this thread (main branch, updating, grouped)."""
    mode = _modes.top()
    return BatchNormMode() if mode is None else mode


def split_layers(model) -> list:
    """Every ``SplitBatchNormalization`` in ``model`` (nested models included), in order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, SplitBatchNormalization)
    ]


def check_branch(bn_branch: str, allow_mixed: bool = True) -> str:
    allowed = BRANCHES + ((MIXED,) if allow_mixed else ())
    if bn_branch not in allowed:
        raise ValueError(f"bn_branch must be one of {', '.join(allowed)}, got {bn_branch!r}")
    return bn_branch


@keras.saving.register_keras_serializable(package="conadv")
class SplitBatchNormalization(keras.layers.Layer):
    """Channels-last BatchNorm with a main and an auxiliary branch.

    Call with ``training`` (batch statistics if true, the branch's moving
    statistics otherwise), ``bn_branch`` ("main", "aux" or "mixed"),
    ``update_stats`` (whether a training call may update the moving
    statistics: ``moving ← momentum·moving + (1 − momentum)·batch``, with the
    biased batch variance as Keras does) and ``group_statistics`` (False: the
    replica's own batch, whatever ``group_size``; the attack uses this). Left
    out (None), the last three come from the enclosing ``batch_norm_mode``;
    ``mask`` is accepted (a functional model passes it) and ignored.

    ``center``, ``scale``, the initializers and the constraints are those of
    ``keras.layers.BatchNormalization`` and apply to both branches. The γ and
    β regularizers are not attached to the variables (Keras would then add
    both branches' penalties to every loss): ``branch_regularization(branch)``
    gives one branch's, for the objective that uses that branch.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        group_size: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        if int(group_size) < 0:
            raise ValueError(f"BatchNorm group size must be >= 0, got {group_size}")
        self.group_size = int(group_size)

    def build(self, input_shape):
        # autocast=False: read in float32 even inside a mixed-precision model.
        channels = int(input_shape[-1])

        def weight(name, initializer, trainable=True, constraint=None):
            # Moving statistics: the mean over replicas when read in cross-replica context.
            aggregation = {} if trainable else {"aggregation": "mean"}
            return self.add_weight(
                name=name,
                shape=(channels,),
                initializer=initializer,
                trainable=trainable,
                constraint=constraint,
                dtype="float32",
                autocast=False,
                **aggregation,
            )

        for branch in BRANCHES:
            gamma = beta = None
            if self.scale:
                gamma = weight(
                    f"{branch}_gamma", self.gamma_initializer, True, self.gamma_constraint
                )
            if self.center:
                beta = weight(f"{branch}_beta", self.beta_initializer, True, self.beta_constraint)
            mean = weight(f"{branch}_moving_mean", self.moving_mean_initializer, False)
            variance = weight(f"{branch}_moving_variance", self.moving_variance_initializer, False)
            setattr(self, f"{branch}_gamma", gamma)
            setattr(self, f"{branch}_beta", beta)
            setattr(self, f"{branch}_moving_mean", mean)
            setattr(self, f"{branch}_moving_variance", variance)

    def branch_variables(self, bn_branch: str) -> dict:
        """``gamma``, ``beta`` (None without ``scale`` / ``center``), ``moving_mean`` and
        ``moving_variance`` of one branch."""
        check_branch(bn_branch, allow_mixed=False)
        return {
            key: getattr(self, f"{bn_branch}_{key}")
            for key in ("gamma", "beta", "moving_mean", "moving_variance")
        }

    def branch_regularization(self, bn_branch: str) -> list[tf.Tensor]:
        """The γ and β regularizers' penalties of one branch: none when the layer is frozen
        (Keras regularizes trainable weights only)."""
        if not self.trainable:
            return []
        params = self.branch_variables(bn_branch)
        return [
            regularizer(params[key])
            for key, regularizer in (
                ("gamma", self.gamma_regularizer),
                ("beta", self.beta_regularizer),
            )
            if regularizer is not None and params[key] is not None
        ]

    def call(
        self,
        inputs,
        training=None,
        mask=None,
        bn_branch=None,
        update_stats=None,
        group_statistics=None,
    ):
        # None: the enclosing batch_norm_mode's choice (a functional model replays
        # the arguments recorded when it was built, so they cannot carry it).
        mode = current_mode()
        bn_branch = mode.bn_branch if bn_branch is None else check_branch(bn_branch)
        update_stats = mode.update_stats if update_stats is None else update_stats
        if group_statistics is None:
            group_statistics = mode.group_statistics
        # As keras.layers.BatchNormalization: a frozen layer (trainable=False)
        # normalises with its moving statistics and never updates them.
        if not self.trainable:
            training = False
        x = tf.cast(inputs, tf.float32)
        if bn_branch == MIXED:
            parts = tf.split(x, 2, axis=0)
            branches = BRANCHES
        else:
            parts, branches = [x], (bn_branch,)
        if training:
            group = self.group_size if group_statistics else 1
            moments = batch_moments(parts, group)
        observe = _observers.top() if training else None
        outputs = []
        for index, (part, branch) in enumerate(zip(parts, branches)):
            params = self.branch_variables(branch)
            if observe is not None and branch == "main":
                observe(self, part)
            if training:
                mean, variance = moments[index]
                if update_stats:
                    decay = 1.0 - self.momentum
                    for var, value in (
                        (params["moving_mean"], mean),
                        (params["moving_variance"], variance),
                    ):
                        var.assign_sub((var - value) * decay)
            else:
                mean = params["moving_mean"].value
                variance = params["moving_variance"].value
            outputs.append(
                tf.nn.batch_normalization(
                    part,
                    mean,
                    variance,
                    None if params["beta"] is None else params["beta"].value,
                    None if params["gamma"] is None else params["gamma"].value,
                    self.epsilon,
                )
            )
        y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            group_size=self.group_size,
        )
        for name in (
            "beta_initializer",
            "gamma_initializer",
            "moving_mean_initializer",
            "moving_variance_initializer",
            "beta_regularizer",
            "gamma_regularizer",
            "beta_constraint",
            "gamma_constraint",
        ):
            config[name] = serialize(getattr(self, name))
        return config
