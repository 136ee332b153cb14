"""The device-resident ring buffer that carries adversarial batches between steps.

ConAdv with staleness τ trains at step t on an adversarial batch that was
made τ steps earlier. The buffer holds, per replica, τ slots of (clean
images, labels, adversarial images) in variables on that replica's device, so
nothing round-trips through the host. Slot ``t mod τ`` is read by step t and
then overwritten with batch t+τ and its fresh attack.

Each replica's slots are its own plain variables (not mirrored): replicas hold
different shards, and a checkpoint saves each one exactly. A replica function
finds its own through its replica id. ``layout`` names the shapes, so that a
checkpoint made with another replica count or batch is not restored into the
wrong slots (the trainer refills the buffer instead).
"""

from __future__ import annotations

import tensorflow as tf


def _replica_devices(strategy) -> list[str | None]:
    """This host's replica devices; the current device under the default strategy."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:
        return [None]


class RingBuffer(tf.Module):
    """τ slots per local replica of (images, labels, adversarial images)."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        staleness: int,
        per_replica_batch: int,
        image_size: int,
        name: str = "ring_buffer",
    ):
        super().__init__(name=name)
        if staleness < 1:
            raise ValueError(f"staleness must be >= 1, got {staleness}")
        self.staleness = int(staleness)
        image_shape = [self.staleness, per_replica_batch, image_size, image_size, 3]
        label_shape = [self.staleness, per_replica_batch]
        self.images = []
        self.labels = []
        self.adversarial = []
        for index, device in enumerate(_replica_devices(strategy)):
            with tf.device(device):
                self.images.append(self._variable(image_shape, tf.float32, f"images_{index}"))
                self.labels.append(self._variable(label_shape, tf.int32, f"labels_{index}"))
                self.adversarial.append(
                    self._variable(image_shape, tf.float32, f"adversarial_{index}")
                )
        # Set once the prologue (or a restored checkpoint) has filled every slot.
        self.filled = tf.Variable(False, trainable=False, name="filled")
        self.layout = f"r{len(self.images)}_b{per_replica_batch}_s{image_size}_t{self.staleness}"

    @staticmethod
    def _variable(shape, dtype, name):
        return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name)

    def _local_index(self) -> int:
        """This replica's index among the local replicas, known when tracing."""
        context = tf.distribute.get_replica_context()
        replica_id = tf.get_static_value(context.replica_id_in_sync_group)
        if replica_id is None:
            raise NotImplementedError(
                "the ring buffer needs a replica id known at trace time "
                "(MirroredStrategy, MultiWorkerMirroredStrategy or a single device)"
            )
        # Multi-worker ids are global: worker k holds k·n .. k·n + n − 1.
        return int(replica_id) % len(self.images)

    def read(self, slot: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """This replica's (images, labels, adversarial images) in ``slot``."""
        i = self._local_index()
        return (
            tf.gather(self.images[i], slot),
            tf.gather(self.labels[i], slot),
            tf.gather(self.adversarial[i], slot),
        )

    def write(self, slot: tf.Tensor, images, labels, adversarial) -> tf.Operation:
        """Overwrites this replica's ``slot``."""
        i = self._local_index()
        index = tf.reshape(slot, [1, 1])
        return tf.group(
            self.images[i].scatter_nd_update(index, images[None]),
            self.labels[i].scatter_nd_update(index, labels[None]),
            self.adversarial[i].scatter_nd_update(index, adversarial[None]),
        )

    def mark_filled(self):
        self.filled.assign(True)

    def is_filled(self) -> bool:
        return bool(self.filled.numpy())
