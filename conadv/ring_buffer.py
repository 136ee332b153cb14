"""The device-resident ring buffer that carries adversarial batches between steps.

Algorithm 1's hand-over: the adversarial examples x*(θ_t) of batch t+τ made
at step t (eq. 5) wait here until step t+τ trains on them (eq. 3–4).

ConAdv with staleness τ trains at step t on an adversarial batch that was
made τ steps earlier. The buffer holds, per replica, τ slots of (clean
images, labels, adversarial images) on that replica's device, so nothing
round-trips through the host. Slot ``t mod τ`` is read by step t and then
overwritten with batch t+τ and its fresh attack.

Each slot array is one variable created in ``strategy.scope()`` with
``synchronization=ON_READ`` and ``aggregation=NONE``: inside ``strategy.run``
every replica reads and writes its own component, under the default,
Mirrored, MultiWorkerMirrored and TPU strategies alike (on TPU through the
replicated variable handle), so no replica id is ever needed — TPUStrategy
traces one program for all replicas and has none at trace time.

A read or a write touches one slot, never the other τ−1: both are the sparse
resource ops (``ResourceGather``, ``ResourceScatterUpdate``) applied to
``var.handle``, which in replica context is this replica's component. The
obvious spellings each cost the whole ring per call, as measured:
``var.assign(tf.tensor_scatter_nd_update(var, …))`` builds a new τ-slot
tensor; a sliced assign (``var[slot].assign``) reads the variable densely and
copies it; and ``tf.gather`` on an ON_READ variable in MirroredStrategy's
replica context reads the whole variable densely, which once a sparse write
has put the variable in copy-on-read mode copies all τ slots.
``var.scatter_update`` is not implemented for ON_READ variables. A variable
per slot picked with ``tf.switch_case`` was slower without XLA (its case op
has τ branches) and under XLA its branches copy the untouched slots.

Under XLA a write alone compiles to an in-place dynamic-update-slice. XLA on
CPU still copies the ring when the same program reads a slot first and uses
it elsewhere (the ConAdv step does), with this spelling or any other tried;
that copy comes from the compiler's aliasing, not from the write.

Images are stored in the compute dtype (bfloat16 halves the buffer on TPU).

An ON_READ variable would be saved as a single aggregate, which cannot hold
per-replica contents; the buffer's variables are therefore kept out of the
checkpoint, and ``checkpoint_items()`` gives the trainer this worker's
per-replica components to save under their own names instead. ``layout``
names the shapes, so a checkpoint made with another replica count or batch
is not restored into the wrong slots (the trainer refills the buffer).
"""

from __future__ import annotations

import math

import tensorflow as tf

from official.per_replica import per_replica_variable

#: The buffer's arrays, in the order ``read`` returns them and ``write`` takes them.
FIELDS = ("images", "labels", "adversarial")
#: The examples' weights, kept beside the batch for ``conadv.keras``'s sample weights.
WEIGHTS = "weights"


def example_shape(image_size) -> tuple[int, ...]:
    """One image's shape: ``image_size`` (square RGB) or an (H, W, C) tuple as it is."""
    if isinstance(image_size, int):
        return (image_size, image_size, 3)
    return tuple(int(d) for d in image_size)


def bytes_per_replica(
    staleness: int,
    per_replica_batch: int,
    image_size,
    dtype,
    label_shape: tuple[int, ...] = (),
    label_dtype=tf.int32,
    clean_images: bool = True,
    sample_weights: bool = False,
) -> int:
    """Memory one replica's slots take: clean (unless not kept) and adversarial images,
    labels, and the examples' weights if kept."""
    examples = staleness * per_replica_batch
    pixels = examples * math.prod(example_shape(image_size))
    label_bytes = examples * math.prod(label_shape) * tf.as_dtype(label_dtype).size
    weight_bytes = examples * 4 if sample_weights else 0
    return (1 + int(clean_images)) * pixels * tf.as_dtype(dtype).size + label_bytes + weight_bytes


class _Untracked:
    """Holds variables where ``tf.train.Checkpoint`` does not look for them."""

    def __init__(self, **variables):
        self.__dict__.update(variables)


def _read_slot(var, slot):
    """This replica's ``var[slot]``, copying that slot only."""
    value = tf.raw_ops.ResourceGather(resource=var.handle, indices=slot, dtype=var.dtype)
    value.set_shape(var.shape[1:])
    return value


def _write_slot(var, slot, value):
    """Sets this replica's ``var[slot]`` in place (the other slots are not touched)."""
    value = tf.cast(value, var.dtype)
    return tf.raw_ops.ResourceScatterUpdate(
        resource=var.handle, indices=tf.reshape(slot, [1]), updates=value[None]
    )


class RingBuffer:
    """Slots per replica of (images, labels, adversarial images).

    ``staleness`` is the number of slots: τ, or τ·N micro-batches of
    ``per_replica_batch`` examples under gradient accumulation of N;
    ``image_size`` is a square RGB image's side or any image's (H, W, C).
    A label is a class id (``label_shape=()``, int32) or, for
    ``conadv.keras``, a target distribution (``label_shape=(C,)``, float32).
    ``clean_images=False`` keeps labels and adversarial images only (the free
    attack's ring, ``conadv/free_attack.py``): ``read`` then gives None for the
    images and ``write`` takes None. ``sample_weights=True`` keeps each example's
    weight (float32) with its batch (``conadv.keras``'s ``sample_weight``), so the
    weight made at step t−τ is the one trained at step t: ``read_weights`` and
    ``write(..., weights=)``.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        staleness: int,
        per_replica_batch: int,
        image_size,
        dtype: tf.DType = tf.float32,
        label_shape: tuple[int, ...] = (),
        label_dtype: tf.DType = tf.int32,
        clean_images: bool = True,
        sample_weights: bool = False,
    ):
        if staleness < 1:
            raise ValueError(f"staleness must be >= 1, got {staleness}")
        self.strategy = strategy
        self.staleness = int(staleness)
        self.dtype = tf.as_dtype(dtype)
        self.per_replica_batch = int(per_replica_batch)
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.example_shape = shape = example_shape(image_size)
        self.image_shape = [self.staleness, per_replica_batch, *shape]
        self.label_shape = tuple(int(d) for d in label_shape)
        self.label_dtype = tf.as_dtype(label_dtype)
        labels_shape = [self.staleness, per_replica_batch, *self.label_shape]
        self.clean_images = bool(clean_images)
        self.sample_weights = bool(sample_weights)
        self.fields = (FIELDS if clean_images else FIELDS[1:]) + (
            (WEIGHTS,) if sample_weights else ()
        )
        with strategy.scope():
            self._vars = _Untracked(
                images=(
                    self._variable(self.image_shape, self.dtype, "ring_images")
                    if clean_images
                    else None
                ),
                labels=self._variable(labels_shape, self.label_dtype, "ring_labels"),
                adversarial=self._variable(self.image_shape, self.dtype, "ring_adversarial"),
                weights=(
                    self._variable(labels_shape[:2], tf.float32, "ring_weights")
                    if sample_weights
                    else None
                ),
            )
        # Set once the prologue (or a restored checkpoint) has filled every slot.
        self.filled = tf.Variable(False, trainable=False, name="ring_filled")
        self.num_local_replicas = len(strategy.experimental_local_results(self._vars.labels))
        dtype_tag = "" if self.dtype == tf.float32 else f"_{self.dtype.name}"
        size_tag = image_size if isinstance(image_size, int) else "x".join(map(str, shape))
        # "v2": per-replica components (a checkpoint of the earlier per-device
        # module has other keys and must not mark this buffer filled). Slot
        # reads and writes changed since, the stored arrays did not.
        label_tag = f"_l{'x'.join(map(str, self.label_shape))}" if self.label_shape else ""
        self.layout = (
            f"v2_r{self.num_local_replicas}_b{per_replica_batch}_s{size_tag}"
            f"_t{self.staleness}{dtype_tag}{label_tag}{'' if clean_images else '_noclean'}"
            f"{'_w' if sample_weights else ''}"
        )

    @staticmethod
    def _variable(shape, dtype, name):
        return per_replica_variable(tf.zeros(shape, dtype), name)

    @property
    def bytes_per_replica(self) -> int:
        """Memory one replica's slots take (images, labels, adversarial images)."""
        return bytes_per_replica(
            self.staleness,
            self.per_replica_batch,
            self.image_size,
            self.dtype,
            self.label_shape,
            self.label_dtype,
            self.clean_images,
            self.sample_weights,
        )

    # ------------------------------------------------- inside strategy.run

    def read(self, slot: tf.Tensor) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor]:
        """This replica's (images, labels, adversarial images) in ``slot`` (images None
        when the ring keeps none)."""
        slot = tf.cast(slot, tf.int32)
        return tuple(
            _read_slot(getattr(self._vars, name), slot) if name in self.fields else None
            for name in FIELDS
        )

    def read_weights(self, slot: tf.Tensor) -> tf.Tensor | None:
        """This replica's example weights in ``slot`` (None when the ring keeps none)."""
        if not self.sample_weights:
            return None
        return _read_slot(self._vars.weights, tf.cast(slot, tf.int32))

    def write(self, slot: tf.Tensor, images, labels, adversarial, weights=None) -> tf.Operation:
        """Overwrites this replica's ``slot`` (images are cast to the buffer's dtype)."""
        slot = tf.cast(slot, tf.int32)
        values = dict(zip(FIELDS, (images, labels, adversarial)), weights=weights)
        if (values["images"] is None) == self.clean_images:
            raise ValueError("give clean images exactly when the ring keeps them")
        if (weights is None) == self.sample_weights:
            raise ValueError("give example weights exactly when the ring keeps them")
        return tf.group(
            *(_write_slot(getattr(self._vars, n), slot, values[n]) for n in self.fields)
        )

    # ----------------------------------------------------------- on the host

    def local_slots(self, name: str) -> list[tf.Variable]:
        """This worker's per-replica components of ``images``, ``labels``, ``adversarial`` or
        ``weights``."""
        return list(self.strategy.experimental_local_results(getattr(self._vars, name)))

    def checkpoint_items(self) -> dict:
        """What a checkpoint saves for this worker: each replica's slots, and ``filled``."""
        items = {"filled": self.filled}
        for name in self.fields:
            for index, component in enumerate(self.local_slots(name)):
                items[f"{name}_{index}"] = component
        return items

    def mark_filled(self):
        self.filled.assign(True)

    def reset(self):
        """Marks the buffer empty: the next training start refills it."""
        self.filled.assign(False)

    def is_filled(self) -> bool:
        return bool(self.filled.numpy())
