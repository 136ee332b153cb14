"""The three training steps — vanilla, DisAdv and ConAdv — as per-replica functions.

One step of Algorithm 1 on one worker: the loss of eq. (2) on the clean batch
(main BatchNorm) and its adversarial batch (auxiliary BatchNorm), whose
gradient updates θ_t (eq. 4); for ConAdv, from the same θ_t, the attack of
the batch τ steps ahead (eq. 5), which neither waits for the update nor
makes it wait, except that θ_t must be read before it is overwritten.

``TrainStep`` runs one optimizer step from the iterator, inside the training
loop's ``tf.function``: one ``strategy.run`` of ``build_step``'s replica
function on the next per-replica batch ``(images, labels)`` or, under
gradient accumulation of N micro-batches, N runs of ``build_micro_step``'s
(``(micro-batch, i)``) and one of ``build_apply_step``'s. Each replica's loss
is a sum divided by the *global* batch, because the optimizer sums gradients
over replicas (and the accumulator over micro-batches).

- vanilla: update on the clean batch through the main BatchNorm branch.
- DisAdv: attack batch t with θ_t, then update on clean_t (main) and adv_t
  (auxiliary) with loss ½·(CE_clean + CE_adv) — two sequential gradients.
- ConAdv: update on (clean_t, adv_t) taken from the ring buffer, where adv_t
  was made τ steps earlier, and, from the same θ_t, attack batch t+τ (the
  batch just taken from the iterator) and write it where slot t mod τ was.

The adversarial update runs, by default, as one forward and one backward
pass over ``[clean; adversarial]`` (2B rows) with every split BatchNorm in
``"mixed"`` mode (``CONCATENATED``); ``SEPARATE`` makes two model calls of B
rows. Both give the same loss, gradients and statistics; which is faster
depends on the device (``python -m conadv.benchmark --update_pass``).

Clean images are rounded to the compute dtype before they are attacked, so
the attack, the ring buffer and the update all see the same clean pixels.
Under float16 the losses are scaled (``official.precision``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import tensorflow as tf

from conadv import attack as attack_lib
from conadv.ring_buffer import RingBuffer
from conadv.run.metrics import ReplicaSums
from conadv.run.nonfinite import NonFiniteGuard
from official import losses, precision
from official.accumulation import GradientAccumulator, OptimizerStep
from official.model_losses import additional_loss
from official.split_batch_norm import call_model

VANILLA = "vanilla"
DISADV = "disadv"
CONADV = "conadv"
METHODS = (VANILLA, DISADV, CONADV)

CONCATENATED = "concatenated"
SEPARATE = "separate"
UPDATE_PASSES = (CONCATENATED, SEPARATE)

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

    def __post_init__(self):
        if self.update_pass not in UPDATE_PASSES:
            raise ValueError(
                f"update_pass must be one of {', '.join(UPDATE_PASSES)}, got {self.update_pass!r}"
            )


class StepGradients(NamedTuple):
    """What a method's step computes on one (micro-)batch, before the update.

    ``labels``, ``clean_logits`` and the per-example losses are those of the
    batch trained on (for ConAdv, the ring's, not the incoming one), for
    metrics such as ``conadv.keras.ConAdvModel``'s; ``extra_loss`` is what
    the model's regularizers added to the objective (``model.losses``, see
    ``official/model_losses.py``; None without any); ``wait_for`` are the
    tensors that must read θ_t before the update overwrites it.
    """

    grads: list
    wait_for: list
    labels: tf.Tensor
    clean_logits: tf.Tensor
    clean_losses: tf.Tensor
    adv_losses: tf.Tensor | None
    extra_loss: tf.Tensor | None = None

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


def weight_gradients(ctx: StepContext, tape, loss) -> list[tf.Tensor]:
    """d loss / d trainable variables; zeros for the branch a step does not use."""
    variables = ctx.model.trainable_variables
    grads = tape.gradient(loss, variables)
    # A zero gradient keeps the unused branch's momentum at 0.
    return [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]


def _apply(ctx: StepContext, grads, clean_sum, adversarial_sum=None, wait_for=()):
    """Applies the (accumulated) gradients; the optimizer unscales them, if it scales.

    ``clean_sum`` and ``adversarial_sum`` (summed per-example losses) and the
    gradients are checked by the context's non-finite guard, if any, for the
    step about to be taken.
    """
    if ctx.guard is not None:
        scaled = ctx.compute_dtype == tf.float16  # the loss scaler handles overflows
        ctx.guard.check(
            ctx.optimizer.iterations, clean_sum, adversarial_sum, None if scaled else grads
        )
    if wait_for:
        # The update may only overwrite θ_t after everything in wait_for has read it.
        with tf.control_dependencies(list(wait_for)):
            grads = [tf.identity(g) for g in grads]
    ctx.optimizer.apply_gradients(zip(grads, ctx.model.trainable_variables))


def _clean_statistics(labels, logits, per_example_loss):
    return dict(
        examples=tf.shape(labels)[0],
        clean_loss=tf.reduce_sum(per_example_loss),
        clean_correct=tf.reduce_sum(losses.top_k_correct(labels, logits, 1)),
    )


def _with_extra(ctx: StepContext, loss, extra):
    """The replica's loss plus its share of the regularizers' ``extra`` loss.

    The optimizer sums the gradients of every replica (and the accumulator
    those of every micro-batch), so each adds ``extra`` divided by their count,
    as Keras' ``fit`` divides ``model.losses`` by the replicas.
    """
    if extra is None:
        return loss
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    return loss + extra / (replicas * ctx.accumulation_steps)


def clean_gradients(ctx: StepContext, images, labels):
    """Gradients of the clean loss through the main branch (one micro-batch), the
    logits, the per-example losses and the regularizers' loss (or None)."""
    with tf.GradientTape() as tape:
        logits = call_model(ctx.model, images, True, "main")
        extra = additional_loss(ctx.model, {"main": 1.0})
        per_example = losses.cross_entropy(labels, logits, ctx.label_smoothing)
        loss = _with_extra(ctx, tf.reduce_sum(per_example) / ctx.global_batch_size, extra)
        scaled_loss = ctx.optimizer.scale_loss(loss)
    grads = weight_gradients(ctx, tape, scaled_loss)
    if ctx.sums is not None:
        ctx.sums.add(**_clean_statistics(labels, logits, per_example))
    return grads, logits, per_example, extra


def _mean_of_present(a, b):
    """½·(a + b) where a missing term (None) is 0; None when both are missing."""
    if a is None and b is None:
        return None
    return 0.5 * ((0.0 if a is None else a) + (0.0 if b is None else b))


def adversarial_loss(ctx: StepContext, images, labels, adversarial):
    """½·(CE_clean through main + CE_adv through aux), over the global batch, plus the
    regularizers' ½·(clean + adversarial) share.

    A training-mode forward pass (both branches' moving statistics update) in
    the context's ``update_pass`` form. Returns the loss, the clean logits,
    the per-example clean and adversarial cross-entropies, and the
    regularizers' loss (or None).
    """
    images = tf.cast(images, tf.float32)
    adversarial = tf.cast(adversarial, tf.float32)
    if ctx.update_pass == CONCATENATED:
        both = tf.concat([images, adversarial], axis=0)
        logits = call_model(ctx.model, both, True, "mixed")
        extra = additional_loss(ctx.model, {"main": 0.5, "aux": 0.5})
        clean_logits, adv_logits = tf.split(logits, 2, axis=0)
    else:
        clean_logits = call_model(ctx.model, images, True, "main")
        clean_extra = additional_loss(ctx.model, {"main": 1.0})
        adv_logits = call_model(ctx.model, adversarial, True, "aux")
        extra = _mean_of_present(clean_extra, additional_loss(ctx.model, {"aux": 1.0}))
    clean = losses.cross_entropy(labels, clean_logits, ctx.label_smoothing)
    adv = losses.cross_entropy(labels, adv_logits, ctx.label_smoothing)
    loss = 0.5 * (tf.reduce_sum(clean) + tf.reduce_sum(adv)) / ctx.global_batch_size
    return _with_extra(ctx, loss, extra), clean_logits, clean, adv, extra


def adversarial_gradients(ctx: StepContext, images, labels, adversarial):
    """Gradients of ½·(CE_clean through main + CE_adv through aux) (one micro-batch),
    the clean logits, the per-example clean and adversarial losses and the
    regularizers' loss (or None)."""
    with tf.GradientTape() as tape:
        loss, clean_logits, clean, adv, extra = adversarial_loss(ctx, images, labels, adversarial)
        scaled_loss = ctx.optimizer.scale_loss(loss)
    grads = weight_gradients(ctx, tape, scaled_loss)
    if ctx.sums is not None:
        distance = attack_lib.linf_distance(
            tf.cast(adversarial, tf.float32), tf.cast(images, tf.float32)
        )
        ctx.sums.add(
            **_clean_statistics(labels, clean_logits, clean),
            adv_examples=tf.shape(labels)[0],
            adv_loss=tf.reduce_sum(adv),
            adv_linf=tf.reduce_sum(distance),
        )
    return grads, clean_logits, clean, adv, extra


def vanilla_gradients(ctx: StepContext, images, labels, index):
    """Vanilla on one (micro-)batch: the clean loss through the main branch."""
    grads, logits, clean, extra = clean_gradients(ctx, as_stored(ctx, images), labels)
    return StepGradients(grads, [], labels, logits, clean, None, extra)


def disadv_gradients(ctx: StepContext, images, labels, index):
    """DisAdv on (micro-)batch ``index``: attack it with θ_t, then the adversarial loss."""
    images = as_stored(ctx, images)
    adversarial = run_attack(ctx, images, labels, batch_index=index)
    grads, logits, clean, adv, extra = adversarial_gradients(ctx, images, labels, adversarial)
    return StepGradients(grads, [], labels, logits, clean, adv, extra)


def conadv_gradients(ctx: StepContext, next_images, next_labels, index):
    """ConAdv on (micro-)batch ``index``: train on its ring slot, attack the incoming one into it.

    The ring holds τ·N micro-batches (N = 1 without accumulation): micro-batch
    m lives in slot m mod τN, was attacked τ optimizer steps ago, and the
    incoming micro-batch m + τN (``next_images``) is attacked with the current
    weights and takes its slot once it has been read.
    """
    ring_size = ctx.ring.staleness
    next_images = as_stored(ctx, next_images)
    slot = tf.cast(index % ring_size, tf.int32)
    images, labels, adversarial = ctx.ring.read(slot)  # made with θ_{t−τ}
    next_adversarial = run_attack(ctx, next_images, next_labels, batch_index=index + ring_size)
    grads, logits, clean, adv, extra = adversarial_gradients(ctx, images, labels, adversarial)
    with tf.control_dependencies(grads):
        ctx.ring.write(slot, next_images, next_labels, next_adversarial)
    # The update may only overwrite θ_t once the attack has read it.
    return StepGradients(grads, [next_adversarial], labels, logits, clean, adv, extra)


_GRADIENTS = {VANILLA: vanilla_gradients, DISADV: disadv_gradients, CONADV: conadv_gradients}


def _gradients_fn(method: str, ctx: StepContext):
    if method not in _GRADIENTS:
        raise ValueError(f"--method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == CONADV and ctx.ring is None:
        raise ValueError("ConAdv needs a ring buffer in the step context")
    return _GRADIENTS[method]


def build_step(method: str, ctx: StepContext):
    """The replica step of one batch: its gradients, then the optimizer step (step t).

    The step returns its ``StepGradients`` (the loop of ``main.py`` ignores them;
    ``ConAdvModel`` updates its metrics from them).
    """
    gradients = _gradients_fn(method, ctx)

    def step(batch):
        images, labels = batch
        index = tf.cast(ctx.optimizer.iterations, tf.int64)
        result = gradients(ctx, images, labels, index)
        _apply(ctx, result.grads, result.clean_sum, result.adv_sum, result.wait_for)
        return result._replace(grads=[], wait_for=[])

    return step


def build_micro_step(method: str, ctx: StepContext):
    """Gradient accumulation: the replica step of micro-batch ``i`` of step t.

    Its gradients go to the context's accumulator; ``build_apply_step``
    applies their sum. Micro-batch i of step t is number t·N + i of the
    stream of micro-batches (its attack seed and ring slot follow from it).
    """
    gradients = _gradients_fn(method, ctx)

    def micro_step(batch, i):
        images, labels = batch
        index = tf.cast(ctx.optimizer.iterations, tf.int64) * ctx.accumulation_steps + i
        result = gradients(ctx, images, labels, index)
        sums = {"clean": result.clean_sum}
        if result.adv_sum is not None:
            sums["adversarial"] = result.adv_sum
        ctx.accumulator.add(result.grads, **sums)

    return micro_step


def build_apply_step(method: str, ctx: StepContext):
    """Gradient accumulation: one optimizer step on the accumulated gradients."""

    def apply_step():
        grads = ctx.accumulator.gradients()
        adversarial = None if method == VANILLA else ctx.accumulator.scalar("adversarial")
        _apply(ctx, grads, ctx.accumulator.scalar("clean"), adversarial)
        ctx.accumulator.reset()

    return apply_step


class TrainStep(OptimizerStep):
    """One optimizer step of ``method`` from an iterator (``official/accumulation.py``): one
    ``strategy.run`` of ``build_step``'s replica step, or, with N micro-batches, N of
    ``build_micro_step``'s and one of ``build_apply_step``'s."""

    def __init__(self, method: str, ctx: StepContext, strategy, jit_compile: bool = False):
        if ctx.accumulation_steps == 1:
            super().__init__(strategy, build_step(method, ctx), jit_compile=jit_compile)
            return
        if ctx.accumulator is None:
            raise ValueError("accumulation_steps > 1 needs an accumulator in the step context")
        micro = build_micro_step(method, ctx), build_apply_step(method, ctx)
        super().__init__(strategy, None, micro, ctx.accumulation_steps, jit_compile)


def build_conadv_prologue(ctx: StepContext):
    """Writes micro-batch ``index``, attacked by the current weights, into its slot.

    Called for the τ·N micro-batches t·N … (t+τ)·N − 1 before step t (t = 0 on
    a fresh run; N = 1 without accumulation), so the buffer holds exactly what
    the ConAdv steps would have left there.
    """

    def prologue_step(batch, index):
        images, labels = batch
        images = as_stored(ctx, images)
        adversarial = run_attack(ctx, images, labels, batch_index=index)
        slot = tf.cast(index % ctx.ring.staleness, tf.int32)
        ctx.ring.write(slot, images, labels, adversarial)

    return prologue_step
