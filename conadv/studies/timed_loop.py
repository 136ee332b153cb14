"""The benchmark's settings and their timed loops (``conadv/studies/benchmark.py`` runs them).

A ``Setting`` is one timed configuration (method × update pass × ConAdv's τ ×
attack source × per-replica batch); a ``TimedLoop`` is its own model, optimizer, ring and
compiled loop of the trainer's step functions on synthetic in-device
batches, warmed up once; ``interleaved_rounds`` times one loop of every
setting per round.
"""

from __future__ import annotations

import dataclasses
import time

import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.ring_buffer import RingBuffer
from conadv.run.metrics import ReplicaSums
from official import group_moments, optimizers, precision, resnet


@dataclasses.dataclass(frozen=True)
class Setting:
    """One timed configuration; ``batch`` is per replica."""

    method: str
    update_pass: str
    staleness: int
    batch: int
    attack_source: str = steps_lib.SEPARATE_ATTACK

    def key(self, passes, stalenesses, batches, sources=()) -> str:
        """Its name in the output: the method and what varies between the settings."""
        key = self.method
        if len(sources) > 1 and self.method != steps_lib.VANILLA:
            key += f"/{self.attack_source}"
        if len(passes) > 1 and self.method != steps_lib.VANILLA:
            key += f"/{self.update_pass}"
        if len(stalenesses) > 1 and self.method == steps_lib.CONADV:
            key += f"/tau={self.staleness}"
        if len(batches) > 1:
            key += f"/batch={self.batch}"
        return key

    def series(self, passes, stalenesses, sources=()) -> str:
        """The key without the batch: one line of the throughput plot."""
        return self.key(passes, stalenesses, [self.batch], sources)


def update_passes(method: str, source: str, passes: list[str]) -> list[str]:
    """The ``--update_pass`` forms a method times: vanilla has one pass of B rows, and
    DisAdv with the free attack two passes whatever is asked (the clean one gives the
    attack's gradient before the adversarial one can run), so one form each."""
    if method == steps_lib.VANILLA:
        return passes[:1]
    if method == steps_lib.DISADV and source == steps_lib.CLEAN_PASS:
        return [steps_lib.SEPARATE]
    return passes


def settings(fv) -> list[Setting]:
    """Every setting, batch-major, the methods in ``--methods`` order within a batch
    (the order of one round)."""
    passes = fv.update_pass
    taus = [int(s) for s in fv.staleness]
    out = []
    for batch in (int(b) for b in fv.batch_sizes):
        for method in fv.methods:
            adversarial = method != steps_lib.VANILLA
            for source in fv.attack_source if adversarial else [steps_lib.SEPARATE_ATTACK]:
                for update_pass in update_passes(method, source, passes):
                    for staleness in taus if method == steps_lib.CONADV else [1]:
                        out.append(Setting(method, update_pass, staleness, batch, source))
    return out


def bn_group_size(fv, replicas: int, batch: int) -> int:
    if fv.bn_group_size is not None:
        return group_moments.check_group_size(fv.bn_group_size, replicas)
    return group_moments.default_group_size(batch, replicas)[0]


class TimedLoop:
    """One setting's model, optimizer, ring and compiled loop, warmed up once.

    ``time_once()`` runs one loop of ``steps_per_loop`` steps and returns its
    clean images per second.
    """

    def __init__(self, setting: Setting, fv, strategy):
        self.setting = setting
        self.steps = fv.steps_per_loop
        replicas = strategy.num_replicas_in_sync
        self.global_batch = setting.batch * replicas
        with strategy.scope():
            model = resnet.resnet(
                fv.model,
                num_classes=fv.num_classes,
                image_size=fv.image_size,
                width_multiplier=fv.width_multiplier,
                bn_group_size=bn_group_size(fv, replicas, setting.batch),
                dtype_policy=fv.precision,
            )
            optimizer = optimizers.build_optimizer("lars", learning_rate=0.1, weight_decay=5e-4)
            if precision.needs_loss_scaling(fv.precision):
                optimizer = precision.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            sums = ReplicaSums(steps_lib.TRAIN_SUMS)
        self.optimizer = optimizer
        compute_dtype = precision.compute_dtype(fv.precision)
        ring = None
        free = setting.attack_source == steps_lib.CLEAN_PASS
        attack = attack_lib.AttackConfig(eps=fv.attack_eps)
        if setting.method == steps_lib.CONADV:
            ring = RingBuffer(
                strategy,
                setting.staleness,
                setting.batch,
                fv.image_size,
                dtype=compute_dtype,
                clean_images=not free,
            )
        ctx = steps_lib.StepContext(
            model=model,
            optimizer=optimizer,
            global_batch_size=self.global_batch,
            num_classes=fv.num_classes,
            label_smoothing=0.1,
            attack=attack.from_clean_pass() if free else attack,
            sums=sums,
            ring=ring,
            update_pass=setting.update_pass,
            compute_dtype=compute_dtype,
            attack_source=setting.attack_source,
        )
        shape = [self.global_batch, fv.image_size, fv.image_size, 3]
        images = tf.random.stateless_uniform(shape, [1, 2], 0.0, 255.0)
        labels = tf.random.stateless_uniform(
            [self.global_batch], [3, 4], 0, fv.num_classes, dtype=tf.int32
        )
        dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(dataset))
        replica_step = tf.function(
            steps_lib.build_step(setting.method, ctx), jit_compile=fv.jit_compile
        )

        @tf.function
        def loop(n):
            for _ in tf.range(n):
                strategy.run(replica_step, args=(next(iterator),))

        if ring is not None:
            prologue = steps_lib.build_conadv_prologue(ctx)

            @tf.function
            def fill(k):
                strategy.run(prologue, args=(next(iterator), k))

            for k in range(setting.staleness):
                fill(tf.constant(k, tf.int64))
        self._loop = loop
        self._n = tf.constant(self.steps)
        self.time_once()  # warm-up: tracing and the first execution
        sums.totals()

    def time_once(self) -> float:
        start = time.perf_counter()
        self._loop(self._n)
        float(self.optimizer.iterations.numpy())  # waits for the loop's last update
        return self.steps * self.global_batch / (time.perf_counter() - start)


class OwnFunctionsFilter:
    """Drops TensorFlow's "triggered tf.function retracing" warning: every setting traces
    functions of its own, once, by design, and the warning counts them as retraces."""

    @staticmethod
    def filter(record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def interleaved_rounds(loops: list[TimedLoop], rounds: int):
    """Per-setting speeds of each round, and the order the loops were timed in.

    Rounds come in pairs: round 2k goes round the settings from setting k, round
    2k+1 goes the same circle backwards. Over 2n rounds each setting is timed in
    every position equally often, and after each of its two neighbours, so neither a
    position effect nor the setting timed just before (a slow one, a cache it
    warmed) favours one setting in every round.
    """
    speeds = [[] for _ in loops]
    order = []
    n = len(loops)
    for round_index in range(rounds):
        circle = [(round_index // 2 + i) % n for i in range(n)]
        for index in reversed(circle) if round_index % 2 else circle:
            speeds[index].append(loops[index].time_once())
            order.append(index)
    return speeds, order
