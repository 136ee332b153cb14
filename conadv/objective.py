"""The objective of eq. (2) on one (micro-)batch, and its gradients.

½·(CE(θ; x, y) through the main BatchNorm + CE(θ; x_adv, y) through the
auxiliary one), summed over the replica's examples and divided by the
*global* batch (the optimizer sums gradients over replicas, and the
accumulator over micro-batches), plus the model's own regularizers
(``model.losses``, ``official/model_losses.py``) weighted as their branches
are. Vanilla's objective is the clean term alone.

Example weights (``conadv.keras``'s ``sample_weight`` and ``class_weight``)
multiply each example's clean and adversarial cross-entropy before the sum,
which is still divided by the global batch: Keras' ``sum_over_batch_size``
reduction of a weighted loss. An adversarial example carries the weight of
the clean example it was made from.
"""

from __future__ import annotations

import tensorflow as tf

from conadv import attack as attack_lib
from conadv.step_context import CONCATENATED, StepContext
from official import losses
from official.model_losses import additional_loss
from official.split_batch_norm import call_model


def weight_gradients(ctx: StepContext, tape, loss) -> list[tf.Tensor]:
    """d loss / d trainable variables; zeros for the branch a step does not use."""
    variables = ctx.model.trainable_variables
    grads = tape.gradient(loss, variables)
    # A zero gradient keeps the unused branch's momentum at 0.
    return [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, variables)]


def clean_statistics(labels, logits, per_example_loss):
    return dict(
        examples=tf.shape(labels)[0],
        clean_loss=tf.reduce_sum(per_example_loss),
        clean_correct=tf.reduce_sum(losses.top_k_correct(labels, logits, 1)),
    )


def extra_share(ctx: StepContext, extra):
    """This replica's (micro-batch's) share of the regularizers' ``extra`` loss (None: none).

    The optimizer sums the gradients of every replica (and the accumulator
    those of every micro-batch), so each adds ``extra`` divided by their count,
    as Keras' ``fit`` divides ``model.losses`` by the replicas.
    """
    if extra is None:
        return None
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    return extra / (replicas * ctx.accumulation_steps)


def with_extra(ctx: StepContext, loss, extra):
    """The replica's loss plus its share of the regularizers' ``extra`` loss."""
    return loss if extra is None else loss + extra_share(ctx, extra)


def weighted(per_example, weights):
    """Each example's loss times its weight (the loss as it is when ``weights`` is None)."""
    return per_example if weights is None else per_example * weights


def clean_gradients(ctx: StepContext, images, labels, weights=None):
    """Gradients of the clean loss through the main branch (one micro-batch), the
    logits, the per-example (weighted) losses and the regularizers' loss (or None)."""
    with tf.GradientTape() as tape:
        logits = call_model(ctx.model, images, True, "main")
        extra = additional_loss(ctx.model, {"main": 1.0})
        per_example = weighted(losses.cross_entropy(labels, logits, ctx.label_smoothing), weights)
        loss = with_extra(ctx, tf.reduce_sum(per_example) / ctx.global_batch_size, extra)
        scaled_loss = ctx.optimizer.scale_loss(loss)
    grads = weight_gradients(ctx, tape, scaled_loss)
    if ctx.sums is not None:
        ctx.sums.add(**clean_statistics(labels, logits, per_example))
    return grads, logits, per_example, extra


def mean_of_present(a, b):
    """½·(a + b) where a missing term (None) is 0; None when both are missing."""
    if a is None and b is None:
        return None
    return 0.5 * ((0.0 if a is None else a) + (0.0 if b is None else b))


def adversarial_loss(ctx: StepContext, images, labels, adversarial, weights=None):
    """½·(CE_clean through main + CE_adv through aux), over the global batch, plus the
    regularizers' ½·(clean + adversarial) share; each example's two terms weighted by
    its weight, if ``weights``.

    A training-mode forward pass (both branches' moving statistics update) in
    the context's ``update_pass`` form. Returns the loss, the clean logits,
    the per-example (weighted) clean and adversarial cross-entropies, and the
    regularizers' loss (or None).
    """
    loss, clean_logits, clean, adv, extra = adversarial_cross_entropy(
        ctx, images, labels, adversarial, weights=weights
    )
    return with_extra(ctx, loss, extra), clean_logits, clean, adv, extra


def adversarial_cross_entropy(
    ctx: StepContext,
    images,
    labels,
    adversarial,
    adversarial_labels=None,
    weights=None,
    adversarial_weights=None,
):
    """``adversarial_loss`` without the regularizers' share: ½·(CE_clean + CE_adv) over the
    global batch, then what ``adversarial_loss`` returns after its loss. The
    adversarial rows are the clean batch's copy, with its labels and weights, unless
    ``adversarial_labels`` (and ``adversarial_weights``) say otherwise (the free attack's
    ConAdv trains on another batch's)."""
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
        extra = mean_of_present(clean_extra, additional_loss(ctx.model, {"aux": 1.0}))
    clean = weighted(losses.cross_entropy(labels, clean_logits, ctx.label_smoothing), weights)
    if adversarial_labels is None:  # the adversarial copy of the clean batch
        adversarial_labels, adversarial_weights = labels, weights
    adv = weighted(
        losses.cross_entropy(adversarial_labels, adv_logits, ctx.label_smoothing),
        adversarial_weights,
    )
    loss = 0.5 * (tf.reduce_sum(clean) + tf.reduce_sum(adv)) / ctx.global_batch_size
    return loss, clean_logits, clean, adv, extra


def adversarial_gradients(ctx: StepContext, images, labels, adversarial, weights=None):
    """Gradients of ½·(CE_clean through main + CE_adv through aux) (one micro-batch),
    the clean logits, the per-example (weighted) clean and adversarial losses and the
    regularizers' loss (or None)."""
    with tf.GradientTape() as tape:
        loss, clean_logits, clean, adv, extra = adversarial_loss(
            ctx, images, labels, adversarial, weights
        )
        scaled_loss = ctx.optimizer.scale_loss(loss)
    grads = weight_gradients(ctx, tape, scaled_loss)
    if ctx.sums is not None:
        distance = attack_lib.linf_distance(
            tf.cast(adversarial, tf.float32), tf.cast(images, tf.float32)
        )
        ctx.sums.add(
            **clean_statistics(labels, clean_logits, clean),
            adv_examples=tf.shape(labels)[0],
            adv_loss=tf.reduce_sum(adv),
            adv_linf=tf.reduce_sum(distance),
        )
    return grads, clean_logits, clean, adv, extra
