"""Softmax cross-entropy with label smoothing, and top-k correctness.

Labels are class ids of shape [N], or target distributions of shape [N, C]
(one-hot or soft, as Keras' ``CategoricalCrossentropy`` takes them).
"""

from __future__ import annotations

import tensorflow as tf


def is_dense(labels) -> bool:
    """Whether ``labels`` are per-class targets ([N, C]) rather than class ids ([N])."""
    rank = tf.TensorShape(labels.shape).rank
    return rank is not None and rank >= 2


def targets(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """The float32 target distribution ``(1 − s)·y + s/C``, y one-hot or given."""
    num_classes = tf.shape(logits)[-1]
    if is_dense(labels):
        onehot = tf.cast(labels, tf.float32)
    else:
        onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if not label_smoothing:
        return onehot
    return onehot * (1.0 - label_smoothing) + label_smoothing / tf.cast(num_classes, tf.float32)


def cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Per-example CE against ``(1 − s)·y + s/C`` targets, from logits; shape [N]."""
    logits = tf.cast(logits, tf.float32)
    return tf.nn.softmax_cross_entropy_with_logits(
        labels=targets(labels, logits, label_smoothing), logits=logits
    )


def class_ids(labels) -> tf.Tensor:
    """Class ids [N]: the labels themselves, or the most probable class of targets [N, C]."""
    if is_dense(labels):
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    return tf.cast(labels, tf.int32)


def top_k_correct(labels, logits, k: int = 1) -> tf.Tensor:
    """1.0 where the label is among the ``k`` largest logits, else 0.0; shape [N]."""
    hit = tf.math.in_top_k(class_ids(labels), tf.cast(logits, tf.float32), k)
    return tf.cast(hit, tf.float32)
