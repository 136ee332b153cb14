"""LARS (You et al., 2017) with the MLPerf ResNet semantics.

For every N-D variable (convolution and dense kernels)

    trust = η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)        (1 if ‖w‖ = 0 or ‖g‖ = 0)
    v ← m·v + lr·trust·(g + wd·w)
    w ← w − v

and for 1-D variables (BatchNorm γ/β, biases) neither weight decay nor the
trust ratio: ``v ← m·v + lr·g``. The norms are per variable, of the
gradient after it has been summed over replicas.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from official.momentum_sgd import MomentumSGD, excluded_from_decay_and_trust


def trust_ratio(weights, gradient, weight_decay: float, eta: float, epsilon: float = 0.0):
    """The layer-wise trust ratio; exactly 1 where either norm is zero."""
    w_norm = tf.norm(tf.reshape(weights, [-1]))
    g_norm = tf.norm(tf.reshape(gradient, [-1]))
    ratio = eta * w_norm / (g_norm + weight_decay * w_norm + epsilon)
    usable = tf.logical_and(w_norm > 0.0, g_norm > 0.0)
    return tf.where(usable, ratio, tf.ones_like(ratio))


class LARS(MomentumSGD):
    """Layer-wise adaptive rate scaling on top of ``MomentumSGD``."""

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        epsilon: float = 0.0,
        name: str = "lars",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        if eta <= 0:
            raise ValueError(f"LARS eta must be > 0, got {eta}")
        self.eta = float(eta)
        self.epsilon = float(epsilon)

    def scaled_step(self, gradient, variable, learning_rate):
        step = super().scaled_step(gradient, variable, learning_rate)
        if excluded_from_decay_and_trust(variable):
            return step
        trust = trust_ratio(variable, gradient, self.l2_weight_decay, self.eta, self.epsilon)
        return ops.cast(trust, step.dtype) * step

    def get_config(self):
        config = super().get_config()
        config.update(eta=self.eta, epsilon=self.epsilon)
        return config
