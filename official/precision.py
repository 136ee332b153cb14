"""Mixed precision: Keras dtype policies for the model, and loss scaling for float16.

``mixed_bfloat16`` is the TPU setting (and runs on CPU): convolutions and
activations in bfloat16, variables in float32, no loss scaling needed, since
bfloat16 has float32's exponent range. ``mixed_float16`` is the GPU setting:
float16's narrow range makes small gradients underflow, so the loss is
multiplied by a loss scale before differentiation and the gradients divided
by it afterwards (dynamic scaling for the update, see ``conadv/steps.py``; a
fixed scale for the attack, whose gradient is only used through its sign).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
MIXED_FLOAT16 = "mixed_float16"
POLICIES = (FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16)

#: The attack's loss scale under float16: large enough that per-pixel input
#: gradients of a summed cross-entropy are normal float16 numbers, small
#: enough that activations' gradients stay below float16's maximum.
ATTACK_LOSS_SCALE = 2.0**10


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"precision must be one of {', '.join(POLICIES)}, got {name!r}")
    return name


def compute_dtype(name: str) -> tf.DType:
    """The dtype activations (and ConAdv's stored images) have under policy ``name``."""
    return {FLOAT32: tf.float32, MIXED_BFLOAT16: tf.bfloat16, MIXED_FLOAT16: tf.float16}[
        check_policy(name)
    ]


def needs_loss_scaling(name: str) -> bool:
    return check_policy(name) == MIXED_FLOAT16


def attack_loss_scale(dtype: tf.DType) -> float:
    """The attack's loss scale for compute ``dtype``: training and robust evaluation share it."""
    return ATTACK_LOSS_SCALE if tf.as_dtype(dtype) == tf.float16 else 1.0


def round_within(x: tf.Tensor, lower: tf.Tensor, upper: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Non-negative float32 ``x`` rounded to ``dtype``, kept inside [lower, upper].

    Rounding to nearest can step past a bound by half a unit in the last
    place (bfloat16 has 8 significant bits: 0.5 at pixel values 128–255);
    where it does, the neighbouring ``dtype`` value on the other side is taken
    instead (one step of the bit pattern; values are ≥ 0). Returns float32
    values that ``dtype`` represents exactly.
    """
    rounded = tf.cast(x, dtype)
    bits = tf.bitcast(rounded, tf.int16)
    below = tf.cast(tf.bitcast(tf.maximum(bits - 1, 0), dtype), tf.float32)
    above = tf.cast(tf.bitcast(bits + 1, dtype), tf.float32)
    nearest = tf.cast(rounded, tf.float32)
    return tf.where(nearest > upper, below, tf.where(nearest < lower, above, nearest))


@contextlib.contextmanager
def policy_scope(name: str):
    """Layers created inside take the dtype policy ``name``; the global policy is restored."""
    check_policy(name)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling, made safe for several replicas.

    Two changes. Keras decides whether to skip a step from the first
    replica's own gradients, before they are summed over replicas, so an
    overflow on another replica would be applied; here the replicas first
    agree (one small all-reduce), and if any overflowed every replica's
    gradients are marked non-finite, so all skip together. And a skipped step
    still counts as a step, as in ``tf.keras``: the training loop derives the
    data position, ConAdv's ring slot and the learning-rate schedule from
    ``iterations``.
    """

    def apply(self, grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            overflowed = context.all_reduce(
                tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32)
            )
            grads = [
                tf.where(
                    overflowed > 0, tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)), g
                )
                for g in grads
            ]
        return super().apply(grads, trainable_variables)

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)
