"""Running sums kept per replica and added up only when read.

Each replica adds its own batch's statistics to its own copy (no
communication inside the step); reading in cross-replica context sums the
copies. The same pattern as Keras metrics, without their per-call overhead.
"""

from __future__ import annotations

import tensorflow as tf


class ReplicaSums(tf.Module):
    """Named float sums, one copy per replica, summed on read."""

    def __init__(self, names, name="replica_sums"):
        super().__init__(name=name)
        self.names = tuple(names)
        self._sums = {
            key: tf.Variable(
                0.0,
                trainable=False,
                dtype=tf.float32,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name=key,
            )
            for key in self.names
        }

    def add(self, **values):
        """Adds to this replica's copy; call inside the replica function."""
        return tf.group(
            *(
                self._sums[key].assign_add(tf.cast(value, tf.float32))
                for key, value in values.items()
            )
        )

    def totals(self) -> dict[str, float]:
        """The sums over all replicas (cross-replica context)."""
        return {key: float(var.read_value().numpy()) for key, var in self._sums.items()}

    def reset(self):
        for var in self._sums.values():
            var.assign(0.0)
