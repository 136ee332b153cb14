"""Per-replica sums of gradients over the micro-batches of one optimizer step.

Gradient accumulation runs each micro-batch as its own ``strategy.run``
call, adds its gradients here, and applies the sum once per step. The sums
live in ``ON_READ`` variables made in ``strategy.scope()``: in replica
context each replica adds to and reads its own copy, with no communication
and no replica id (so it works alike under Mirrored, MultiWorkerMirrored
and TPU strategies); the optimizer's ``apply_gradients`` then all-reduces
the sums as it would one batch's gradients. They are zero at every step
boundary, so checkpoints need not hold them.
"""

from __future__ import annotations

import tensorflow as tf

from official.per_replica import per_replica_variable


class GradientAccumulator:
    """Sums of gradients (one per variable) and of named scalars, per replica."""

    def __init__(self, strategy: tf.distribute.Strategy, variables, scalars=()):
        def zeros(shape, dtype, name):
            return per_replica_variable(tf.zeros(shape, dtype), name)

        with strategy.scope():
            self._gradients = [
                zeros(v.shape, v.dtype, f"accumulated_{i}") for i, v in enumerate(variables)
            ]
            self._scalars = {name: zeros([], tf.float32, f"accumulated_{name}") for name in scalars}

    def add(self, gradients, **scalars):
        """Adds one micro-batch's gradients (and scalars); call in replica context."""
        updates = [var.assign_add(g) for var, g in zip(self._gradients, gradients)]
        updates += [self._scalars[name].assign_add(value) for name, value in scalars.items()]
        return tf.group(updates)

    def gradients(self) -> list[tf.Tensor]:
        return [var.read_value() for var in self._gradients]

    def scalar(self, name: str) -> tf.Tensor:
        return self._scalars[name].read_value()

    def reset(self):
        """Zeroes this replica's sums; call in replica context after they were read."""
        return tf.group(
            [var.assign(tf.zeros_like(var)) for var in self._gradients]
            + [var.assign(0.0) for var in self._scalars.values()]
        )


class OptimizerStep:
    """One optimizer step from an iterator; call in cross-replica context, in a tf.function.

    Without accumulation, one ``strategy.run`` of ``step`` on the next batch.
    With N micro-batches (``micro = (micro_step, apply_step)``), N
    ``strategy.run`` calls of ``micro_step(batch, i)``, each on the next
    micro-batch (one forward and backward pass of B/N rows, and any
    BatchNorm group collectives, per call), then one of ``apply_step()``,
    which applies their sum. Each replica function is one XLA program when
    ``jit_compile`` is set.
    """

    def __init__(self, strategy, step, micro=None, micro_batches: int = 1, jit_compile=False):
        self.strategy = strategy
        self.n = int(micro_batches)
        if self.n == 1:
            self._step = tf.function(step, jit_compile=jit_compile)
        else:
            micro_step, apply_step = micro
            self._micro = tf.function(micro_step, jit_compile=jit_compile)
            self._apply = tf.function(apply_step, jit_compile=jit_compile)

    def __call__(self, iterator):
        if self.n == 1:
            self.strategy.run(self._step, args=(next(iterator),))
            return
        for i in tf.range(tf.constant(self.n, tf.int64)):
            self.strategy.run(self._micro, args=(next(iterator), i))
        self.strategy.run(self._apply)
