"""Step throughput of vanilla, DisAdv and ConAdv, timed in interleaved rounds.

    python -m conadv.benchmark --model resnet20 --image_size 32 --batch_sizes 256
    python -m conadv.benchmark --batch_sizes 16,32,64,128,256 --output_json t.json --plot t.png
    python -m conadv.benchmark --update_pass concatenated,separate --methods conadv
    python -m conadv.benchmark --precision mixed_bfloat16 --num_cpu_devices 2 --bn_group_size 1
    python -m conadv.benchmark --methods conadv --staleness 1,8,32

Every setting (method × update pass × ConAdv's τ × per-replica batch) gets
its own model, optimizer, ring and compiled loop of the trainer's step
functions on synthetic in-device batches, and one warm-up loop. Then each
round times one loop of every setting in turn (vanilla, DisAdv, ConAdv,
vanilla, …), so slow phases of a shared machine fall on all settings alike;
a setting's speed is the median of its rounds in clean images per second,
and a ratio between two settings is the median of their per-round ratios.
Every setting's state is alive at once: on an accelerator, time fewer
settings per run if they do not fit.

The ideal ConAdv/vanilla ratio counts work in forward-pass units: a forward
pass costs 1, an input-gradient backward pass 1 (activations only) and a full
backward pass 2 (activations and weights). Vanilla does 3 per image; ConAdv
does 2 (the attack on B) plus 6 (the update on 2B) per clean image; DisAdv
does the same work as ConAdv but in two dependent halves, so ConAdv can beat
it only where the processor has room to run both halves at once.

``--update_pass`` times the adversarial update as one pass over 2B rows
(concatenated) and as two passes of B rows (separate); ``--num_cpu_devices``
splits the CPU to run the step under MirroredStrategy (with its BatchNorm
group collectives). ``--staleness`` times ConAdv at each listed τ (its ring
holds τ batches per replica; a step reads and writes one of them, so the
speed should not depend on τ). ``--output_json`` writes one entry per setting
(with its per-round speeds), the ratios, the order the loops were timed in,
and the ring buffer's bytes per replica; ``--plot`` draws images/s against
the per-replica batch (log-2 axis) and the ConAdv/DisAdv and ConAdv/vanilla
ratios per batch.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import tensorflow as tf
from absl import flags as absl_flags

from conadv import attack as attack_lib
from conadv import ring_buffer
from conadv import steps as steps_lib
from conadv.ring_buffer import RingBuffer
from conadv.run.metrics import ReplicaSums
from flags import benchmark as benchmark_flags
from flags.validation import FlagError
from official import distribute, optimizers, precision, resnet
from official import split_batch_norm as bn_lib

FORWARD, INPUT_GRADIENT, FULL_BACKWARD = 1.0, 1.0, 2.0
VANILLA_WORK = FORWARD + FULL_BACKWARD
ADVERSARIAL_WORK = (FORWARD + INPUT_GRADIENT) + 2 * (FORWARD + FULL_BACKWARD)
IDEAL_CONADV_OVER_VANILLA = VANILLA_WORK / ADVERSARIAL_WORK


@dataclasses.dataclass(frozen=True)
class Setting:
    """One timed configuration; ``batch`` is per replica."""

    method: str
    update_pass: str
    staleness: int
    batch: int

    def key(self, passes, stalenesses, batches) -> str:
        """Its name in the output: the method and what varies between the settings."""
        key = self.method
        if len(passes) > 1 and self.method != steps_lib.VANILLA:
            key += f"/{self.update_pass}"
        if len(stalenesses) > 1 and self.method == steps_lib.CONADV:
            key += f"/tau={self.staleness}"
        if len(batches) > 1:
            key += f"/batch={self.batch}"
        return key

    def series(self, passes, stalenesses) -> str:
        """The key without the batch: one line of the throughput plot."""
        return self.key(passes, stalenesses, [self.batch])


def settings(fv) -> list[Setting]:
    """Every setting, batch-major, the methods in ``--methods`` order within a batch
    (the order of one round)."""
    passes = fv.update_pass
    taus = [int(s) for s in fv.staleness]
    out = []
    for batch in (int(b) for b in fv.batch_sizes):
        for method in fv.methods:
            for update_pass in passes if method != steps_lib.VANILLA else passes[:1]:
                for staleness in taus if method == steps_lib.CONADV else [1]:
                    out.append(Setting(method, update_pass, staleness, batch))
    return out


def _device_name(device: str) -> str:
    if device in ("cpu", "gpu"):
        devices = tf.config.list_logical_devices(device.upper())
        if not devices:
            raise SystemExit(f"error: --device={device}: no such device on this machine")
        return devices[0].name
    return device


def bn_group_size(fv, replicas: int, batch: int) -> int:
    if fv.bn_group_size is not None:
        return bn_lib.check_group_size(fv.bn_group_size, replicas)
    return bn_lib.default_group_size(batch, replicas)[0]


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
        if setting.method == steps_lib.CONADV:
            ring = RingBuffer(
                strategy, setting.staleness, setting.batch, fv.image_size, dtype=compute_dtype
            )
        ctx = steps_lib.StepContext(
            model=model,
            optimizer=optimizer,
            global_batch_size=self.global_batch,
            num_classes=fv.num_classes,
            label_smoothing=0.1,
            attack=attack_lib.AttackConfig(eps=fv.attack_eps),
            sums=sums,
            ring=ring,
            update_pass=setting.update_pass,
            compute_dtype=compute_dtype,
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


class _OwnFunctionsFilter:
    """Drops TensorFlow's "triggered tf.function retracing" warning: every setting traces
    functions of its own, once, by design, and the warning counts them as retraces."""

    @staticmethod
    def filter(record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def interleaved_rounds(loops: list[TimedLoop], rounds: int):
    """Per-setting speeds of each round, and the order the loops were timed in."""
    speeds = [[] for _ in loops]
    order = []
    for _ in range(rounds):
        for index, loop in enumerate(loops):
            speeds[index].append(loop.time_once())
            order.append(index)
    return speeds, order


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a's speed over b's in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def ratios(rounds: dict[Setting, list[float]], fv) -> dict[str, float]:
    """ConAdv over DisAdv and vanilla, concatenated over separate, and each τ over the
    first, per batch; each the median of per-round ratios."""
    passes, taus = fv.update_pass, [int(s) for s in fv.staleness]
    batches = [int(b) for b in fv.batch_sizes]

    def name(setting):
        return setting.key(passes, taus, batches)

    out = {}
    for setting, speeds in rounds.items():
        others = []
        if setting.method == steps_lib.CONADV:
            for method in (steps_lib.DISADV, steps_lib.VANILLA):
                update_pass = setting.update_pass if method != steps_lib.VANILLA else passes[0]
                others.append(Setting(method, update_pass, 1, setting.batch))
            if setting.staleness != taus[0]:
                others.append(dataclasses.replace(setting, staleness=taus[0]))
        if setting.method != steps_lib.VANILLA and setting.update_pass == "concatenated":
            others.append(dataclasses.replace(setting, update_pass="separate"))
        for other in others:
            if other in rounds:
                label = f"{name(setting)}_over_{name(other)}"
                out[label] = median_ratio(speeds, rounds[other])
    return out


def ring_buffer_bytes_per_replica(fv, batch: int, staleness: int) -> int:
    """What ConAdv's ring holds per replica in this configuration (τ slots)."""
    return ring_buffer.bytes_per_replica(
        staleness, batch, fv.image_size, precision.compute_dtype(fv.precision)
    )


def plot(result: dict, path: str):
    """Images/s against the per-replica batch per setting, and ConAdv's ratios per batch."""
    from conadv import plots

    rates, ratio_series = {}, {}
    for row in result["results"]:
        xs, ys = rates.setdefault(row["series"], ([], []))
        xs.append(row["batch_per_replica"])
        ys.append(row["images_per_second"])
    for row in result["ratio_rows"]:
        xs, ys = ratio_series.setdefault(row["series"], ([], []))
        xs.append(row["batch_per_replica"])
        ys.append(row["ratio"])
    config = result["config"]
    title = (
        f"{config['model']} at {config['image_size']} px, {result['replicas']} replica(s), "
        f"{config['precision']}"
    )
    return plots.throughput(rates, ratio_series, path, title)


def parse(argv) -> absl_flags.FlagValues:
    """The benchmark's flags from ``argv`` (without the program name), validated."""
    fv = absl_flags.FlagValues()
    benchmark_flags.define(fv)
    try:
        fv(["conadv.benchmark", *argv])
    except absl_flags.Error as error:
        raise FlagError(str(error).splitlines()[0]) from None
    benchmark_flags.validate(fv)
    return fv


def run(fv) -> dict:
    """Builds every setting, times the rounds, and returns the result (see module doc)."""
    if fv.num_cpu_devices > 1:
        distribute.configure_cpu_devices(fv.num_cpu_devices)
        strategy = distribute.get_strategy("mirrored", fv.num_cpu_devices)
    else:
        strategy = tf.distribute.OneDeviceStrategy(_device_name(fv.device))
    replicas = strategy.num_replicas_in_sync
    passes, taus = fv.update_pass, [int(s) for s in fv.staleness]
    batches = [int(b) for b in fv.batch_sizes]
    all_settings = settings(fv)
    tf.get_logger().addFilter(_OwnFunctionsFilter)
    loops = []
    for setting in all_settings:
        print(f"building {setting.key(passes, taus, batches)}", flush=True)
        loops.append(TimedLoop(setting, fv, strategy))
    speeds, order = interleaved_rounds(loops, fv.loops)
    rounds = dict(zip(all_settings, speeds))
    results = [
        {
            "key": setting.key(passes, taus, batches),
            "series": setting.series(passes, taus),
            "method": setting.method,
            "update_pass": setting.update_pass,
            "staleness": setting.staleness,
            "batch_per_replica": setting.batch,
            "global_batch": setting.batch * replicas,
            "images_per_second": statistics.median(speeds[i]),
            "rounds": speeds[i],
        }
        for i, setting in enumerate(all_settings)
    ]
    ratio_rows = []
    for setting in all_settings:
        if setting.method != steps_lib.CONADV:
            continue
        for method in (steps_lib.DISADV, steps_lib.VANILLA):
            update_pass = setting.update_pass if method != steps_lib.VANILLA else passes[0]
            other = Setting(method, update_pass, 1, setting.batch)
            if other in rounds:
                ratio_rows.append(
                    {
                        "series": f"{setting.series(passes, taus)} / {method}",
                        "batch_per_replica": setting.batch,
                        "ratio": median_ratio(rounds[setting], rounds[other]),
                    }
                )
    ring_bytes = {str(tau): ring_buffer_bytes_per_replica(fv, max(batches), tau) for tau in taus}
    config_keys = (
        "model",
        "width_multiplier",
        "image_size",
        "batch_sizes",
        "device",
        "steps_per_loop",
        "loops",
        "jit_compile",
        "precision",
        "update_pass",
        "staleness",
        "num_cpu_devices",
    )
    return {
        "config": {key: fv[key].value for key in config_keys},
        "replicas": replicas,
        "bn_group_size": {str(b): bn_group_size(fv, replicas, b) for b in batches},
        "ring_buffer_bytes_per_replica": ring_bytes[str(max(taus))],
        "ring_buffer_bytes_per_replica_by_staleness": ring_bytes,
        "results": results,
        "methods": {row["key"]: {"images_per_second": row["images_per_second"]} for row in results},
        "ratios": ratios(rounds, fv),
        "ratio_rows": ratio_rows,
        "timing_order": [results[i]["key"] for i in order],
        "ideal_conadv_over_vanilla": IDEAL_CONADV_OVER_VANILLA,
    }


def report(result: dict, fv):
    """The console table: one row per setting, then the ratios."""
    replicas = result["replicas"]
    where = fv.device if replicas == 1 else f"{replicas} logical CPU replicas"
    print(
        f"{fv.model} at {fv.image_size}px, per-replica batch {','.join(fv.batch_sizes)}, "
        f"{where}, {fv.precision}, jit={fv.jit_compile}: median of {fv.loops} interleaved "
        f"rounds of one {fv.steps_per_loop}-step loop per setting"
    )
    width = max(24, *(len(row["key"]) + 2 for row in result["results"]))
    print(f"{'setting':<{width}}{'clean img/s':>14}")
    for row in result["results"]:
        print(f"{row['key']:<{width}}{row['images_per_second']:>14.1f}")
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.3f}")
    print(f"ideal conadv_over_vanilla from counted work: {IDEAL_CONADV_OVER_VANILLA:.3f}")
    batch = max(int(b) for b in fv.batch_sizes)
    for staleness, size in result["ring_buffer_bytes_per_replica_by_staleness"].items():
        print(f"ring buffer: {size} bytes per replica (τ = {staleness}, {batch} images each)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv):
        fv = absl_flags.FlagValues()
        benchmark_flags.define(fv)
        print(__doc__)
        print(fv.get_help())
        return None
    try:
        fv = parse(argv)
    except FlagError as error:
        raise SystemExit(f"error: {error}") from None
    result = run(fv)
    report(result, fv)
    if fv.output_json:
        with open(fv.output_json, "w") as f:
            json.dump(result, f, indent=2)
    if fv.plot:
        plot(result, fv.plot)
        print(f"plot: {fv.plot}")
    return result


if __name__ == "__main__":
    main()
