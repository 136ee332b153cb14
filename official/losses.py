"""Softmax cross-entropy with label smoothing, and top-k correctness."""

from __future__ import annotations

import tensorflow as tf


def cross_entropy(labels, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Per-example CE against ``(1 − s)·onehot + s/C`` targets, from logits; shape [N]."""
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(
            num_classes, tf.float32
        )
    return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def top_k_correct(labels, logits, k: int = 1) -> tf.Tensor:
    """1.0 where the label is among the ``k`` largest logits, else 0.0; shape [N]."""
    hit = tf.math.in_top_k(tf.cast(labels, tf.int32), tf.cast(logits, tf.float32), k)
    return tf.cast(hit, tf.float32)
