"""The three training steps — vanilla, DisAdv and ConAdv — as per-replica functions.

One step of Algorithm 1 on one worker: the loss of eq. (2) on the clean batch
(main BatchNorm) and its adversarial batch (auxiliary BatchNorm), whose
gradient updates θ_t (eq. 4); for ConAdv, from the same θ_t, the attack of
the batch τ steps ahead (eq. 5), which neither waits for the update nor
makes it wait, except that θ_t must be read before it is overwritten.

``TrainStep`` runs one optimizer step from the iterator, inside the training
loop's ``tf.function``: one ``strategy.run`` of ``build_step``'s replica
function on the next per-replica batch ``(images, labels)`` (``conadv.keras``
adds each example's weight: ``(images, labels, weights)``) or, under
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
depends on the device (``conadv-benchmark --update_pass``).

With ``attack_source`` ``clean_pass`` DisAdv and ConAdv take their
adversarial images from the update's clean pass instead of an attack pass
of their own (``conadv/free_attack.py``). The objective and its gradients
are in ``conadv/objective.py``, the step context in
``conadv/step_context.py``. Under float16 the losses are scaled
(``official.precision``).
"""

from __future__ import annotations

import tensorflow as tf

from conadv import free_attack, objective
from conadv.objective import adversarial_loss, weight_gradients  # noqa: F401
from conadv.step_context import (  # noqa: F401 (the steps' public names)
    ATTACK_SOURCES,
    CLEAN_PASS,
    CONADV,
    CONCATENATED,
    DISADV,
    METHODS,
    SEPARATE,
    SEPARATE_ATTACK,
    TRAIN_SUMS,
    UPDATE_PASSES,
    VANILLA,
    StepContext,
    StepGradients,
    as_stored,
    attack_seed,
    run_attack,
)
from official.accumulation import OptimizerStep


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


def vanilla_gradients(ctx: StepContext, images, labels, index, weights=None):
    """Vanilla on one (micro-)batch: the clean loss through the main branch."""
    grads, logits, clean, extra = objective.clean_gradients(
        ctx, as_stored(ctx, images), labels, weights
    )
    return StepGradients(grads, [], labels, logits, clean, None, extra, weights)


def disadv_gradients(ctx: StepContext, images, labels, index, weights=None):
    """DisAdv on (micro-)batch ``index``: attack it with θ_t, then the adversarial loss.

    The attack maximises each example's own cross-entropy, whatever its weight:
    a weight scales the example's share of the update, not its worst case.
    """
    images = as_stored(ctx, images)
    adversarial = run_attack(ctx, images, labels, batch_index=index)
    grads, logits, clean, adv, extra = objective.adversarial_gradients(
        ctx, images, labels, adversarial, weights
    )
    return StepGradients(grads, [], labels, logits, clean, adv, extra, weights)


def conadv_gradients(ctx: StepContext, next_images, next_labels, index, next_weights=None):
    """ConAdv on (micro-)batch ``index``: train on its ring slot, attack the incoming one into it.

    The ring holds τ·N micro-batches (N = 1 without accumulation): micro-batch
    m lives in slot m mod τN, was attacked τ optimizer steps ago, and the
    incoming micro-batch m + τN (``next_images``) is attacked with the current
    weights and takes its slot once it has been read. Example weights travel
    in the ring with their batch: those trained now came with it τ steps ago.
    """
    ring_size = ctx.ring.staleness
    next_images = as_stored(ctx, next_images)
    slot = tf.cast(index % ring_size, tf.int32)
    images, labels, adversarial = ctx.ring.read(slot)  # made with θ_{t−τ}
    weights = ctx.ring.read_weights(slot)
    next_adversarial = run_attack(ctx, next_images, next_labels, batch_index=index + ring_size)
    grads, logits, clean, adv, extra = objective.adversarial_gradients(
        ctx, images, labels, adversarial, weights
    )
    with tf.control_dependencies(grads):
        ctx.ring.write(slot, next_images, next_labels, next_adversarial, next_weights)
    # The update may only overwrite θ_t once the attack has read it.
    return StepGradients(grads, [next_adversarial], labels, logits, clean, adv, extra, weights)


_GRADIENTS = {
    (VANILLA, SEPARATE_ATTACK): vanilla_gradients,
    (VANILLA, CLEAN_PASS): vanilla_gradients,  # no attack to take from anywhere
    (DISADV, SEPARATE_ATTACK): disadv_gradients,
    (DISADV, CLEAN_PASS): free_attack.disadv_gradients,
    (CONADV, SEPARATE_ATTACK): conadv_gradients,
    (CONADV, CLEAN_PASS): free_attack.conadv_gradients,
}


def _gradients_fn(method: str, ctx: StepContext):
    if method not in METHODS:
        raise ValueError(f"--method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == CONADV and ctx.ring is None:
        raise ValueError("ConAdv needs a ring buffer in the step context")
    if method == CONADV and ctx.ring.clean_images != (ctx.attack_source == SEPARATE_ATTACK):
        raise ValueError(
            "ConAdv's ring keeps clean images for the separate attack, and only for it"
        )
    free = method != VANILLA and ctx.attack_source == CLEAN_PASS
    if free and ctx.attack != ctx.attack.from_clean_pass():
        raise ValueError(
            "the free attack (clean_pass) is one untargeted step from the clean image "
            f"through the main BatchNorm, not {ctx.attack}: use AttackConfig.from_clean_pass()"
        )
    return _GRADIENTS[method, ctx.attack_source]


def build_step(method: str, ctx: StepContext):
    """The replica step of one batch: its gradients, then the optimizer step (step t).

    The step returns its ``StepGradients`` (the loop of ``main.py`` ignores them;
    ``ConAdvModel`` updates its metrics from them). ``batch`` is ``(images,
    labels)`` or ``(images, labels, weights)``.
    """
    gradients = _gradients_fn(method, ctx)

    def step(batch):
        images, labels, *weights = batch
        index = tf.cast(ctx.optimizer.iterations, tf.int64)
        result = gradients(ctx, images, labels, index, *weights)
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
    the ConAdv steps would have left there. The free attack has its own
    (``free_attack.build_prologue``).
    """
    if ctx.attack_source == CLEAN_PASS:
        return free_attack.build_prologue(ctx)

    def prologue_step(batch, index):
        images, labels, *weights = batch
        images = as_stored(ctx, images)
        adversarial = run_attack(ctx, images, labels, batch_index=index)
        slot = tf.cast(index % ctx.ring.staleness, tf.int32)
        ctx.ring.write(slot, images, labels, adversarial, *weights)

    return prologue_step
