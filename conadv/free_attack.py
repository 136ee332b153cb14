"""The free attack (``--attack_source clean_pass``): adversarial images from the clean
pass's input gradient.

The update's clean pass already runs a backward pass through the whole
network on the clean batch; one more layer of it is ∇ₓL(θ_t; x, y), the
gradient a 1-step attack from the clean image through the main BatchNorm
computes. One ``GradientTape.gradient`` call returns the weights' gradients
and the input's, so the attack needs no pass of its own: per clean image 6
units of work (forward 1, backward 2, for the clean and the adversarial
rows) instead of 8 — the idea of "free" adversarial training (Shafahi et
al., NeurIPS 2019), applied to ConAdv's stale examples.

How it differs from the separate attack (``conadv/attack.py``):

- Its loss is the clean pass's cross-entropy: label-smoothed as trained, over
  the global batch, ½ of the objective's. Like the separate attack's it leaves
  out the model's regularizers (``model.losses``; an activity regularizer's
  penalty depends on the images too): they reach the weights by a second
  gradient call that stops at the weights (none without regularizers; for an
  activity regularizer, one more backward pass below its layer). Only
  the gradient's sign is used, so only the smoothing matters: with
  ``--label_smoothing 0`` it is the separate attack's gradient (1 step, no
  random start, main branch: the flags it needs), for any model.
- It normalises with the clean pass's statistics: those of the BatchNorm
  group (the separate attack uses the replica's own batch; the same with
  the default groups of one replica).
- DisAdv: step t's clean pass gives batch t's x_adv(θ_t), then the
  adversarial pass runs (two passes where the separate attack makes three).
- ConAdv: step t's clean pass is on the batch it reads from the stream; its
  x_adv(θ_t) goes into the ring with its labels, and step t+τ trains on it as
  its adversarial batch beside that step's own clean batch. The stale
  adversarial images are thus another batch's than the clean ones, made τ
  steps earlier; the paper pairs each clean batch with its own adversarial
  copy. The ring keeps labels and adversarial images only, and the prologue
  reads the first τ batches of the stream only to make their adversarial
  images (with the input gradient of the same cross-entropy through the same
  branch, without an update); so does the refill of an emptied ring.
- Example weights (``conadv.keras``'s ``sample_weight``) weight the clean
  pass's cross-entropy, so the input gradient is the weighted one: its sign is
  the same for a positive weight, and an example of weight 0, which adds
  nothing to the update, is left unperturbed. ConAdv's ring keeps each
  batch's weights with its adversarial images.
"""

from __future__ import annotations

import tensorflow as tf

from conadv import objective
from conadv.step_context import StepContext, StepGradients, as_stored
from official import losses, precision
from official.model_losses import additional_loss
from official.split_batch_norm import call_model

#: The BatchNorm branch of the clean pass, through which the free attack differentiates
#: (its steps and its prologue alike): the separate attack's ``--attack_bn main``.
CLEAN_BRANCH = "main"


def unscaled(ctx: StepContext, input_gradient) -> tf.Tensor:
    """The input gradient of the scaled loss, unscaled: float16 training scales the loss
    (small gradients would flush to zero before their sign is taken); an
    overflowed pixel's gradient has no usable sign and is left at 0."""
    if input_gradient is None:  # the loss does not reach the input
        raise ValueError("the clean pass's loss does not depend on the input images")
    input_gradient = tf.cast(input_gradient, tf.float32)
    finite = tf.math.is_finite(input_gradient)
    input_gradient = tf.where(finite, input_gradient, tf.zeros_like(input_gradient))
    scale = tf.cast(ctx.optimizer.scale_loss(tf.constant(1.0, tf.float32)), tf.float32)
    return input_gradient / scale


def adversarial_from_gradient(ctx: StepContext, images, input_gradient) -> tf.Tensor:
    """x + α·sign(∇ₓL), clipped to the ε-ball and the valid range; a pixel whose gradient
    is 0 stays. Under a 16-bit compute dtype the images are rounded to it inside
    those bounds, as the separate attack's are."""
    config = ctx.attack
    lower = tf.maximum(images - config.eps, config.input_min)
    upper = tf.minimum(images + config.eps, config.input_max)
    adversarial = tf.clip_by_value(images + config.alpha * tf.sign(input_gradient), lower, upper)
    adversarial = tf.stop_gradient(adversarial)
    if ctx.compute_dtype == tf.float32:
        return adversarial
    return precision.round_within(adversarial, lower, upper, ctx.compute_dtype)


def _scaled_terms(ctx: StepContext, cross_entropy, extra):
    """Inside the tape: the scaled cross-entropy, and the scaled share of the regularizers'
    loss ``extra`` (None without any)."""
    share = objective.extra_share(ctx, extra)
    scaled_extra = None if share is None else ctx.optimizer.scale_loss(share)
    return ctx.optimizer.scale_loss(cross_entropy), scaled_extra


def _weights_and_input(ctx: StepContext, tape, scaled_cross_entropy, scaled_extra, images):
    """d (cross-entropy + regularizers) / d trainable variables (zeros where unused) and
    the unscaled d cross-entropy / d images.

    The cross-entropy's backward pass gives the weights' gradients and the input's
    together. The attack differentiates the cross-entropy alone, as the separate
    attack does: the regularizers (``model.losses``, an activity regularizer's
    penalty depending on the images too) reach the weights by a second call on the
    same persistent tape, which stops at the weights.
    """
    variables = ctx.model.trainable_variables
    *grads, input_gradient = tape.gradient(scaled_cross_entropy, [*variables, images])
    if scaled_extra is not None:
        extra_grads = tape.gradient(scaled_extra, variables)
        grads = [e if g is None else g if e is None else g + e for g, e in zip(grads, extra_grads)]
    grads = [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]
    return grads, unscaled(ctx, input_gradient)


def half_cross_entropy(ctx: StepContext, labels, logits, weights=None):
    """One pass's per-example cross-entropy (label-smoothed, as trained; weighted, with
    ``weights``) and its half of the objective, ½·ΣCE over the global batch. Through
    ``CLEAN_BRANCH`` it is the loss whose input gradient the free attack takes, in its
    steps and its prologue."""
    per_example = objective.weighted(
        losses.cross_entropy(labels, logits, ctx.label_smoothing), weights
    )
    return per_example, 0.5 * tf.reduce_sum(per_example) / ctx.global_batch_size


def _half(extra):
    return None if extra is None else 0.5 * extra


def clean_pass(ctx: StepContext, images, labels, weights=None):
    """DisAdv's clean pass (training mode, through ``CLEAN_BRANCH``): the gradients of its
    half of the objective, ½·(CE + the clean network's regularizers), the unscaled
    input gradient of its cross-entropy alone, the logits, the per-example losses and
    the regularizers' loss (or None)."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(images)
        logits = call_model(ctx.model, images, True, CLEAN_BRANCH)
        extra = additional_loss(ctx.model, {CLEAN_BRANCH: 1.0})
        per_example, cross_entropy = half_cross_entropy(ctx, labels, logits, weights)
        scaled = _scaled_terms(ctx, cross_entropy, _half(extra))
    grads, input_gradient = _weights_and_input(ctx, tape, *scaled, images)
    return grads, input_gradient, logits, per_example, extra


def _adversarial_pass(ctx: StepContext, adversarial, labels, weights=None):
    """DisAdv's adversarial pass (training mode, auxiliary branch): the gradients of its
    half of the objective, ½·(CE + the adversarial network's regularizers), the
    per-example losses and the regularizers' loss (or None)."""
    with tf.GradientTape() as tape:
        logits = call_model(ctx.model, adversarial, True, "aux")
        extra = additional_loss(ctx.model, {"aux": 1.0})
        per_example, cross_entropy = half_cross_entropy(ctx, labels, logits, weights)
        loss = objective.with_extra(ctx, cross_entropy, _half(extra))
        scaled_loss = ctx.optimizer.scale_loss(loss)
    return objective.weight_gradients(ctx, tape, scaled_loss), per_example, extra


def _add_sums(ctx, labels, logits, clean, adv_labels, adv, adversarial, attacked):
    if ctx.sums is not None:
        distance = tf.reduce_max(tf.abs(adversarial - attacked), axis=[1, 2, 3])
        ctx.sums.add(
            **objective.clean_statistics(labels, logits, clean),
            adv_examples=tf.shape(adv_labels)[0],
            adv_loss=tf.reduce_sum(adv),
            adv_linf=tf.reduce_sum(distance),
        )


def disadv_gradients(ctx: StepContext, images, labels, index, weights=None):
    """DisAdv on (micro-)batch ``index``: its clean pass gives x_adv(θ_t), then the
    adversarial pass; the gradient of ½·(CE_clean + CE_adv) is the two passes' sum."""
    images = as_stored(ctx, images)
    grads, input_gradient, logits, clean, clean_extra = clean_pass(ctx, images, labels, weights)
    adversarial = adversarial_from_gradient(ctx, images, input_gradient)
    adv_grads, adv, adv_extra = _adversarial_pass(ctx, adversarial, labels, weights)
    grads = [a + b for a, b in zip(grads, adv_grads)]
    extra = objective.mean_of_present(clean_extra, adv_extra)
    _add_sums(ctx, labels, logits, clean, labels, adv, adversarial, images)
    return StepGradients(grads, [], labels, logits, clean, adv, extra, weights)


def conadv_gradients(ctx: StepContext, images, labels, index, weights=None):
    """ConAdv on (micro-)batch ``index``: the update on its clean batch and the ring's
    adversarial batch (made τ steps ago from another batch), whose clean pass makes
    this batch's x_adv(θ_t) and writes it, with its labels (and weights), where that
    slot was."""
    images = as_stored(ctx, images)
    slot = tf.cast(index % ctx.ring.staleness, tf.int32)
    _, adv_labels, adversarial = ctx.ring.read(slot)  # made with θ_{t−τ}
    adv_weights = ctx.ring.read_weights(slot)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(images)
        # Of this cross-entropy only the clean half reads ``images``.
        cross_entropy, logits, clean, adv, extra = objective.adversarial_cross_entropy(
            ctx, images, labels, adversarial, adv_labels, weights, adv_weights
        )
        scaled = _scaled_terms(ctx, cross_entropy, extra)
    grads, input_gradient = _weights_and_input(ctx, tape, *scaled, images)
    next_adversarial = adversarial_from_gradient(ctx, images, input_gradient)
    with tf.control_dependencies(grads):
        ctx.ring.write(slot, None, labels, next_adversarial, weights)
    _add_sums(ctx, labels, logits, clean, adv_labels, adv, next_adversarial, images)
    # The gradients (hence the write) have read θ_t before the update.
    return StepGradients(grads, [], labels, logits, clean, adv, extra, weights)


def build_prologue(ctx: StepContext):
    """ConAdv's prologue (and the refill of an emptied ring): micro-batch ``index``'s x_adv
    from the input gradient the steps take, that of the clean pass's cross-entropy
    through ``CLEAN_BRANCH``, at the current weights (statistics not updated, no weight
    gradient), with its labels, into its slot."""

    def prologue_step(batch, index):
        images, labels, *weights = batch
        images = as_stored(ctx, images)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(images)
            logits = call_model(ctx.model, images, True, CLEAN_BRANCH, update_stats=False)
            _, cross_entropy = half_cross_entropy(ctx, labels, logits, *weights)
            scaled_loss = ctx.optimizer.scale_loss(cross_entropy)
        input_gradient = unscaled(ctx, tape.gradient(scaled_loss, images))
        slot = tf.cast(index % ctx.ring.staleness, tf.int32)
        adversarial = adversarial_from_gradient(ctx, images, input_gradient)
        ctx.ring.write(slot, None, labels, adversarial, *weights)

    return prologue_step
