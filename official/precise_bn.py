"""Precise BatchNorm statistics: population moments under the final weights.

The moving statistics BatchNorm keeps while training are an exponential
average over recent batches, each computed under the weights of its own step.
Evaluation wants the statistics of the network as it is now. PreciseBN (Wu &
Johnson, *Rethinking "Batch" in BatchNorm*, 2021) recomputes them: run N
batches through the network in training mode (every BatchNorm normalises with
its batch statistics, as in training, and updates nothing) and take, for
every BatchNorm, the mean and biased variance of its inputs over all
examples of all N batches — exact averages of per-batch sums, not an EMA.

Sums are float32 and shifted, per layer, by the mean of its inputs in the
first batch (one extra forward pass of one batch; every replica and worker
uses the same shift, so the sums add up, and a mean far from zero does not
cancel the variance, whatever the moving statistics hold); each batch's sums
are added across replicas and workers with ``strategy.reduce``. Only the main
branch is recomputed: it is the one evaluated and exported.

The recomputed statistics replace the moving ones only inside
``PreciseBatchNorm.applied``, so the training state (and what a resumed run
computes) keeps its EMA.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from official import split_batch_norm as bn_lib


@dataclasses.dataclass
class PreciseStatistics:
    """The main branch's population statistics of every split BatchNorm."""

    means: list[np.ndarray]
    variances: list[np.ndarray]
    #: Batches and examples the statistics were taken over (all replicas and workers).
    batches: int
    examples: int


def shifted_sums(x: tf.Tensor, shift: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(Σ(x−K), Σ(x−K)², count) per channel over all but the last axis, in float32."""
    axes = list(range(len(x.shape) - 1))
    centered = tf.cast(x, tf.float32) - tf.cast(shift, tf.float32)
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    return tf.reduce_sum(centered, axes), tf.reduce_sum(tf.square(centered), axes), count


class MainInputSums:
    """``sums[layer] = (Σ(x−K), Σ(x−K)², n)`` of every main-branch input ``x`` a forward pass
    gives a split BatchNorm (all its calls), observed with ``observe_main_inputs``.

    ``K = shifts[layer]`` (default: the branch's moving mean) must be the same
    on every replica, so the sums add up across replicas, and close to the
    mean, so a large mean does not cancel the variance.
    """

    def __init__(self, shifts: dict | None = None):
        self.shifts = shifts or {}
        self.sums: dict = {}

    def __call__(self, layer, x):
        shift = self.shifts.get(layer, layer.main_moving_mean.value)
        sums = shifted_sums(x, shift)
        if layer in self.sums:
            sums = tuple(a + b for a, b in zip(self.sums[layer], sums))
        self.sums[layer] = sums


class PreciseBatchNorm:
    """Computes and applies precise main-branch statistics for one model.

    ``model`` is called in training mode inside ``batch_norm_mode("main",
    update_stats=False)``, in replica context; every split BatchNorm in it
    must be reached by that call. A frozen BatchNorm (``trainable=False``)
    normalises with its moving statistics in training mode too, so it keeps
    them, as Keras keeps a frozen BatchNorm's; a layer called more than once
    gets the statistics of its inputs over all its calls.
    """

    def __init__(self, model, strategy: tf.distribute.Strategy):
        self.model = model
        self.strategy = strategy
        split = bn_lib.split_layers(model)
        if not split:
            raise ValueError(f"model {model.name!r} has no split BatchNorm layer")
        self.layers = [layer for layer in split if layer.trainable]
        self._row_sizes = [2 * layer.main_moving_mean.shape[0] + 1 for layer in self.layers]
        self._accumulate = tf.function(self._accumulate_fn)

    def _replica_sums(self, batch, shifts):
        images = batch[0]
        collector = MainInputSums(dict(zip(self.layers, shifts)))
        with bn_lib.observe_main_inputs(collector):
            bn_lib.call_model(self.model, images, True, "main", update_stats=False)
        missing = [layer.name for layer in self.layers if layer not in collector.sums]
        if missing:
            raise ValueError(
                f"precise BatchNorm: the forward pass did not reach {', '.join(missing[:3])}"
            )
        # One vector: per layer [Σ(x−K) (C), Σ(x−K)² (C), n], then the batch size (a
        # multi-worker reduce packs the tensors it is given, which must share a shape).
        rows = [
            tf.concat([s1, s2, n[None]], 0) for s1, s2, n in map(collector.sums.get, self.layers)
        ]
        return tf.concat([*rows, tf.cast(tf.shape(images)[:1], tf.float32)], 0)

    def _accumulate_fn(self, iterator, num_batches, shifts):
        """Sums shifted by ``shifts`` over at most ``num_batches`` batches (fewer if the data
        ends)."""
        totals = tf.zeros([sum(self._row_sizes) + 1])
        batches = tf.constant(0)
        for _ in tf.range(num_batches):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            per_replica = self.strategy.run(self._replica_sums, args=(optional.get_value(), shifts))
            totals += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            batches += 1
        return totals, batches

    def compute(self, dataset: tf.distribute.DistributedDataset, num_batches: int):
        """Population statistics over the first ``num_batches`` batches of ``dataset``."""
        if num_batches < 1:
            raise ValueError(f"precise BatchNorm needs at least one batch, got {num_batches}")
        # The first batch's means, as shifts for the sums over every batch.
        shifts = [layer.main_moving_mean.numpy() for layer in self.layers]
        first, batches = self._accumulate(iter(dataset), tf.constant(1, tf.int32), shifts)
        if int(batches) == 0:
            raise ValueError("precise BatchNorm: the dataset gave no batch")
        shifts, _ = self._moments(shifts, first)
        totals, batches = self._accumulate(
            iter(dataset), tf.constant(num_batches, tf.int32), shifts
        )
        means, variances = self._moments(shifts, totals)
        examples = int(round(float(totals[-1])))
        return PreciseStatistics(means, variances, int(batches), examples)

    def _moments(self, shifts, totals):
        """Per-layer (means, biased variances) from the sums shifted by ``shifts``."""
        means, variances = [], []
        rows = np.split(totals.numpy()[:-1], np.cumsum(self._row_sizes)[:-1])
        for shift, row in zip(shifts, rows):
            channels = (row.shape[0] - 1) // 2
            centered, squares, count = row[:channels], row[channels:-1], max(float(row[-1]), 1.0)
            offset = centered / count
            means.append((shift + offset).astype(np.float32))
            variances.append(np.maximum(squares / count - offset**2, 0.0).astype(np.float32))
        return means, variances

    def assign(self, statistics: PreciseStatistics):
        """Makes ``statistics`` the main branch's moving statistics, for good."""
        for layer, mean, variance in zip(self.layers, statistics.means, statistics.variances):
            layer.main_moving_mean.assign(mean)
            layer.main_moving_variance.assign(variance)

    @contextlib.contextmanager
    def applied(self, statistics: PreciseStatistics):
        """The main branch's moving statistics are ``statistics`` inside the context."""
        saved = [
            (layer.main_moving_mean.numpy(), layer.main_moving_variance.numpy())
            for layer in self.layers
        ]
        try:
            self.assign(statistics)
            yield statistics
        finally:
            for layer, (mean, variance) in zip(self.layers, saved):
                layer.main_moving_mean.assign(mean)
                layer.main_moving_variance.assign(variance)
