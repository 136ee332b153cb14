"""The losses a Keras model adds to its objective: ``model.losses``, per BatchNorm branch.

Keras' ``fit`` minimises the compiled loss plus ``sum(model.losses)``: the
activity regularizers' penalties of the call just made (each divided by
that call's batch) and the weight regularizers' penalties of the trainable
weights. With split BatchNorm a network is two networks that share every
weight but BatchNorm's: the clean one (main branch) and the adversarial one
(auxiliary branch). Each network's objective carries its own penalties, so
the regularizers of a split BatchNorm's γ and β are kept off ``model.losses``
(``SplitBatchNormalization.branch_regularization``) and added here for the
branches a call used, weighted as the call's share of the objective.
"""

from __future__ import annotations

import tensorflow as tf

from official.split_batch_norm import split_layers


def additional_loss(model, branch_weights: dict[str, float]) -> tf.Tensor | None:
    """``Σ model.losses`` of the call just made, plus ``Σ_b w_b ·`` branch b's γ/β penalties.

    Read it right after the call: the next call of ``model`` replaces the
    activity penalties. ``branch_weights`` is ``{"main": 1}`` for a call
    through the main branch, and ``{"main": ½, "aux": ½}`` for one "mixed"
    call over ``[clean; adversarial]`` (whose activity penalties, divided by
    its 2B rows, are already ½·(clean + adversarial)). None when the model
    adds nothing, so a model without regularizers computes what it did.
    """
    terms = [tf.reduce_sum(tf.cast(loss, tf.float32)) for loss in model.losses]
    for layer in split_layers(model):
        for branch, weight in branch_weights.items():
            terms.extend(
                weight * tf.cast(penalty, tf.float32)
                for penalty in layer.branch_regularization(branch)
            )
    return tf.add_n(terms) if terms else None
