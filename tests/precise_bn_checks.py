"""Precise BatchNorm against NumPy: shared by the one-device test and the 2-replica program.

A two-layer model (split BatchNorm → 1×1 projection → split BatchNorm) whose
second BatchNorm's inputs depend on the first one's *batch* statistics, so
the NumPy reference below recomputes the whole forward pass: each replica's
shard normalised by its own moments, then the population moments of every
layer's inputs over all examples of the batches used.
"""

import keras
import numpy as np
import tensorflow as tf

from official.precise_bn import PreciseBatchNorm
from official.split_batch_norm import SplitBatchNormalization

EPSILON = 1e-3
WRONG_MEAN, WRONG_VARIANCE = 1000.0, 1e-3


class TwoBatchNorms(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn1 = SplitBatchNormalization(epsilon=EPSILON)
        self.project = keras.layers.Dense(4, use_bias=False)
        self.bn2 = SplitBatchNormalization(epsilon=EPSILON)

    def call(self, x, training=False):
        # Both layers read their branch and update rule from the caller's batch_norm_mode.
        return self.bn2(self.project(self.bn1(x, training=training)), training=training)


def make_data(batches: int, global_batch: int, seed: int = 0) -> np.ndarray:
    """[batches, global_batch, 2, 2, 3] with a large mean that differs per batch."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batches, global_batch, 2, 2, 3)).astype(np.float32) * 3.0
    x += 200.0 + 5.0 * np.arange(batches, dtype=np.float32)[:, None, None, None, None]
    return x


def build(strategy):
    with strategy.scope():
        model = TwoBatchNorms()
        model(np.zeros((1, 2, 2, 3), np.float32))
        rng = np.random.default_rng(1)
        for layer in (model.bn1, model.bn2):
            channels = layer.main_gamma.shape[0]
            layer.main_gamma.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
            layer.main_beta.assign(rng.normal(size=channels).astype(np.float32))
            # Deliberately wrong: precise BatchNorm must not depend on them.
            layer.main_moving_mean.assign(np.full(channels, WRONG_MEAN, np.float32))
            layer.main_moving_variance.assign(np.full(channels, WRONG_VARIANCE, np.float32))
    return model


def numpy_reference(model, data: np.ndarray, replicas: int):
    """Population (mean, variance) of both layers' inputs; float64, per-shard batch moments."""
    gamma1, beta1 = model.bn1.main_gamma.numpy(), model.bn1.main_beta.numpy()
    kernel = model.project.kernel.numpy().astype(np.float64)
    first, second = [], []
    for batch in data.astype(np.float64):
        for shard in np.split(batch, replicas):
            mean, variance = shard.mean(axis=(0, 1, 2)), shard.var(axis=(0, 1, 2))
            normalised = (shard - mean) / np.sqrt(variance + EPSILON) * gamma1 + beta1
            first.append(shard.reshape(-1, 3))
            second.append((normalised @ kernel).reshape(-1, 4))
    return [(np.mean(np.concatenate(v), 0), np.var(np.concatenate(v), 0)) for v in (first, second)]


def check(strategy, batches_in_data: int = 4, batches_used: int = 3, per_replica: int = 8):
    """Errors of the applied statistics (means in standard deviations, variances
    relative), and whether the moving statistics came back intact."""
    replicas = strategy.num_replicas_in_sync
    data = make_data(batches_in_data, per_replica * replicas)
    model = build(strategy)
    dataset = tf.data.Dataset.from_tensor_slices((data, np.zeros(data.shape[:2], np.int32)))
    distributed = strategy.experimental_distribute_dataset(dataset)
    precise = PreciseBatchNorm(model, strategy)
    statistics = precise.compute(distributed, batches_used)
    expected = numpy_reference(model, data[:batches_used], replicas)
    errors = []
    with precise.applied(statistics):
        for layer, (mean, variance) in zip((model.bn1, model.bn2), expected):
            # Means in units of the standard deviation (a mean may be near 0).
            scale = np.sqrt(variance)
            errors.append(float(np.max(np.abs(layer.main_moving_mean.numpy() - mean) / scale)))
            errors.append(
                float(np.max(np.abs(layer.main_moving_variance.numpy() - variance) / variance))
            )
        aux_untouched = all(
            np.all(layer.aux_moving_mean.numpy() == 0) and np.all(layer.aux_moving_variance == 1)
            for layer in (model.bn1, model.bn2)
        )
    restored = all(
        np.all(layer.main_moving_mean.numpy() == WRONG_MEAN)
        and np.all(layer.main_moving_variance.numpy() == np.float32(WRONG_VARIANCE))
        for layer in (model.bn1, model.bn2)
    )
    return {
        "max_rel_error": max(errors),
        "batches": statistics.batches,
        "examples": statistics.examples,
        "aux_untouched": bool(aux_untouched),
        "moving_restored": bool(restored),
    }
