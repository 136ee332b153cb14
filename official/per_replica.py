"""Variables of which every replica holds its own copy.

Made in ``strategy.scope()`` with ``synchronization=ON_READ`` and no
aggregation: in replica context each replica reads and writes its own
component on Mirrored, MultiWorkerMirrored and TPU strategies alike, with no
replica id (TPUStrategy has none at trace time) and no communication. On the
host, ``strategy.experimental_local_results`` gives this worker's components.
"""

from __future__ import annotations

import tensorflow as tf


def per_replica_variable(initial_value, name: str) -> tf.Variable:
    """A non-trainable per-replica variable; create it inside ``strategy.scope()``."""
    return tf.Variable(
        initial_value,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.NONE,
    )
