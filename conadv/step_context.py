"""What a training step works with: the step context, what a step's gradients come
with, and the adversarial images' seeds and pixels.

Shared by the steps of ``conadv/steps.py``, the objective of eq. (2)
(``conadv/objective.py``) and the free attack (``conadv/free_attack.py``).
Clean images are rounded to the compute dtype before they are attacked
(``as_stored``), so the attack, the ring buffer and the update all see the
same clean pixels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tensorflow as tf

from conadv import attack as attack_lib
from conadv.ring_buffer import RingBuffer
from conadv.run.metrics import ReplicaSums
from conadv.run.nonfinite import NonFiniteGuard
from official import precision
from official.accumulation import GradientAccumulator

VANILLA = "vanilla"
DISADV = "disadv"
CONADV = "conadv"
METHODS = (VANILLA, DISADV, CONADV)

CONCATENATED = "concatenated"
SEPARATE = "separate"
UPDATE_PASSES = (CONCATENATED, SEPARATE)

#: Where DisAdv's and ConAdv's adversarial images come from (``conadv/free_attack.py``).
SEPARATE_ATTACK = "separate"
CLEAN_PASS = "clean_pass"
ATTACK_SOURCES = (SEPARATE_ATTACK, CLEAN_PASS)

#: What every step adds to the loop's running sums.
TRAIN_SUMS = ("examples", "clean_loss", "clean_correct", "adv_examples", "adv_loss", "adv_linf")


@dataclasses.dataclass
class StepContext:
    """Everything a step touches, built once by the trainer."""

    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    global_batch_size: int
    num_classes: int
    label_smoothing: float = 0.0
    attack: attack_lib.AttackConfig = dataclasses.field(default_factory=attack_lib.AttackConfig)
    seed: int = 0
    sums: ReplicaSums | None = None
    ring: RingBuffer | None = None
    update_pass: str = CONCATENATED
    compute_dtype: tf.DType = tf.float32
    guard: NonFiniteGuard | None = None
    #: Micro-batches per optimizer step (the ring then holds τ·N micro-batches).
    accumulation_steps: int = 1
    #: Per-replica gradient sums when accumulation_steps > 1 (official/accumulation.py).
    accumulator: GradientAccumulator | None = None
    #: ``separate``: the attack's own passes (the paper); ``clean_pass``: the free attack.
    attack_source: str = SEPARATE_ATTACK

    def __post_init__(self):
        if self.update_pass not in UPDATE_PASSES:
            raise ValueError(
                f"update_pass must be one of {', '.join(UPDATE_PASSES)}, got {self.update_pass!r}"
            )
        if self.attack_source not in ATTACK_SOURCES:
            raise ValueError(
                f"attack_source must be one of {', '.join(ATTACK_SOURCES)}, "
                f"got {self.attack_source!r}"
            )


class StepGradients(NamedTuple):
    """What a method's step computes on one (micro-)batch, before the update.

    ``labels``, ``clean_logits`` and the per-example losses are those of the
    batch trained on (for ConAdv, the ring's, not the incoming one), for
    metrics such as ``conadv.keras.ConAdvModel``'s; ``extra_loss`` is what
    the model's regularizers added to the objective (``model.losses``, see
    ``official/model_losses.py``; None without any); ``wait_for`` are the
    tensors that must read θ_t before the update overwrites it. With example
    weights (``conadv.keras``'s ``sample_weight``) the per-example losses are
    weighted as the objective weights them, and ``sample_weight`` holds the
    weights of the batch trained on (None without weights).
    """

    grads: list
    wait_for: list
    labels: tf.Tensor
    clean_logits: tf.Tensor
    clean_losses: tf.Tensor
    adv_losses: tf.Tensor | None
    extra_loss: tf.Tensor | None = None
    sample_weight: tf.Tensor | None = None

    @property
    def clean_sum(self) -> tf.Tensor:
        return tf.reduce_sum(self.clean_losses)

    @property
    def adv_sum(self) -> tf.Tensor | None:
        return None if self.adv_losses is None else tf.reduce_sum(self.adv_losses)


def attack_seed(ctx: StepContext, batch_index) -> tf.Tensor:
    """The attack's random seed for one batch on this replica.

    A function of the batch's position in the data stream, not of the step
    that happens to attack it, so DisAdv (which attacks batch t at step t)
    and ConAdv (which attacks it at step t − τ) draw the same random start.
    """
    replica = tf.distribute.get_replica_context()
    replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int64)
    num_replicas = tf.cast(replica.num_replicas_in_sync, tf.int64)
    index = tf.cast(batch_index, tf.int64) * num_replicas + replica_id
    return tf.stack([tf.constant(ctx.seed, tf.int64), index])


def run_attack(ctx: StepContext, images, labels, batch_index) -> tf.Tensor:
    """Adversarial images for ``images`` (already ``as_stored``), as they are stored.

    Under a 16-bit compute dtype the result is rounded to that dtype while
    staying within ε of the stored clean images, so DisAdv and ConAdv train
    on the same pixels and the ring's contents respect the budget exactly.
    """
    adversarial = attack_lib.pgd_attack(
        ctx.model,
        images,
        labels,
        ctx.attack,
        seed=attack_seed(ctx, batch_index),
        num_classes=ctx.num_classes,
        loss_scale=precision.attack_loss_scale(ctx.compute_dtype),
    )
    if ctx.compute_dtype == tf.float32:
        return adversarial
    lower = tf.maximum(images - ctx.attack.eps, ctx.attack.input_min)
    upper = tf.minimum(images + ctx.attack.eps, ctx.attack.input_max)
    return precision.round_within(adversarial, lower, upper, ctx.compute_dtype)


def as_stored(ctx: StepContext, images) -> tf.Tensor:
    """Clean images rounded to the compute dtype, as float32 (what every pass sees)."""
    if ctx.compute_dtype == tf.float32:
        return tf.cast(images, tf.float32)
    return tf.cast(tf.cast(images, ctx.compute_dtype), tf.float32)
