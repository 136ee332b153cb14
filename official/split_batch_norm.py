"""BatchNorm with two independent branches (AdvProp's split BatchNorm).

Clean and adversarial images have different statistics; mixing them in one
BatchNorm hurts clean accuracy (Xie et al., 2020). Each layer therefore
keeps a *main* branch (clean images; used for evaluation and export) and an
*auxiliary* branch (adversarial images), each with its own γ, β and moving
statistics. The caller picks the branch per call, and whether the moving
statistics of that branch may update — the attack's forward pass uses batch
statistics but must leave every variable untouched.
"""

from __future__ import annotations

import keras
import tensorflow as tf

BRANCHES = ("main", "aux")


def check_branch(bn_branch: str) -> str:
    if bn_branch not in BRANCHES:
        raise ValueError(f"bn_branch must be 'main' or 'aux', got {bn_branch!r}")
    return bn_branch


def batch_moments(x: tf.Tensor, synchronized: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and biased variance over all but the channel axis.

    With ``synchronized`` and more than one replica, sums, sums of squares and
    counts are all-reduced, so the moments are those of the global batch
    (replicas with unequal shards are weighted by their size).
    """
    axes = list(range(len(x.shape) - 1))
    context = tf.distribute.get_replica_context()
    if not synchronized or context is None or context.num_replicas_in_sync == 1:
        mean, variance = tf.nn.moments(x, axes)
        return mean, variance
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    local = tf.concat(
        [tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], axis=0
    )
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
    channels = x.shape[-1]
    n = tf.maximum(total[-1], 1.0)
    mean = total[:channels] / n
    variance = tf.maximum(total[channels : 2 * channels] / n - tf.square(mean), 0.0)
    return mean, variance


class SplitBatchNormalization(keras.layers.Layer):
    """Channels-last BatchNorm with a main and an auxiliary branch.

    Call with ``training`` (batch statistics if true, the branch's moving
    statistics otherwise), ``bn_branch`` ("main" or "aux") and
    ``update_stats`` (whether a training call may update that branch's
    moving statistics: ``moving ← momentum·moving + (1 − momentum)·batch``,
    with the biased batch variance as Keras does).
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        gamma_initializer="ones",
        synchronized: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        for branch in BRANCHES:
            gamma = self.add_weight(
                name=f"{branch}_gamma", shape=(channels,), initializer=self.gamma_initializer
            )
            beta = self.add_weight(name=f"{branch}_beta", shape=(channels,), initializer="zeros")
            mean = self.add_weight(
                name=f"{branch}_moving_mean",
                shape=(channels,),
                initializer="zeros",
                trainable=False,
                aggregation="mean",
            )
            variance = self.add_weight(
                name=f"{branch}_moving_variance",
                shape=(channels,),
                initializer="ones",
                trainable=False,
                aggregation="mean",
            )
            setattr(self, f"{branch}_gamma", gamma)
            setattr(self, f"{branch}_beta", beta)
            setattr(self, f"{branch}_moving_mean", mean)
            setattr(self, f"{branch}_moving_variance", variance)

    def branch_variables(self, bn_branch: str) -> dict:
        check_branch(bn_branch)
        return {
            key: getattr(self, f"{bn_branch}_{key}")
            for key in ("gamma", "beta", "moving_mean", "moving_variance")
        }

    def call(self, inputs, training=False, bn_branch="main", update_stats=True):
        params = self.branch_variables(bn_branch)
        x = tf.convert_to_tensor(inputs)
        if training:
            mean, variance = batch_moments(x, self.synchronized)
            if update_stats:
                decay = 1.0 - self.momentum
                for var, value in (
                    (params["moving_mean"], mean),
                    (params["moving_variance"], variance),
                ):
                    var.assign_sub((var - tf.cast(value, var.dtype)) * decay)
        else:
            mean = params["moving_mean"].value
            variance = params["moving_variance"].value
        return tf.nn.batch_normalization(
            x, mean, variance, params["beta"].value, params["gamma"].value, self.epsilon
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            synchronized=self.synchronized,
        )
        return config
