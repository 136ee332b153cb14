"""Step throughput of vanilla, DisAdv and ConAdv, timed in interleaved rounds.

    conadv-benchmark --model resnet20 --image_size 32 --batch_sizes 256
    conadv-benchmark --batch_sizes 16,32,64,128,256 --output_json t.json --plot t.png
    conadv-benchmark --update_pass concatenated,separate --methods conadv
    conadv-benchmark --precision mixed_bfloat16 --num_cpu_devices 2 --bn_group_size 1
    conadv-benchmark --methods conadv --staleness 1,8,32
    conadv-benchmark --attack_source separate,clean_pass --batch_sizes 256

(``python -m conadv.studies.benchmark`` is the same program.)

Every setting (method × update pass × ConAdv's τ × per-replica batch) gets
its own model, optimizer, ring and compiled loop of the trainer's step
functions on synthetic in-device batches, and one warm-up loop. Then each
round times one loop of every setting in turn (vanilla, DisAdv, ConAdv,
vanilla, …), starting one setting later than the round before, so slow
phases of a shared machine fall on all settings alike and no setting always
follows the same one;
a setting's speed is the median of its rounds in clean images per second,
and a ratio between two settings is the median of their per-round ratios.
Every setting's state is alive at once: on an accelerator, time fewer
settings per run if they do not fit.

The ideal ConAdv/vanilla ratio counts work in forward-pass units: a forward
pass costs 1, an input-gradient backward pass 1 (activations only) and a full
backward pass 2 (activations and weights). Vanilla does 3 per image; ConAdv
does 2 (the attack on B) plus 6 (the update on 2B) per clean image; DisAdv
does the same work as ConAdv but in two dependent halves, so ConAdv can beat
it only where the processor has room to run both halves at once. With
``--attack_source clean_pass`` (the free attack, ``conadv/free_attack.py``)
the attack's 2 units go: both do 6, ConAdv/vanilla is ideally 1/2 and
clean_pass/separate 4/3, on any processor.

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

import tensorflow as tf
from absl import flags as absl_flags

from conadv import ring_buffer
from conadv import steps as steps_lib
from conadv.studies.timed_loop import (
    OwnFunctionsFilter,
    Setting,
    TimedLoop,
    bn_group_size,
    interleaved_rounds,
    settings,
    update_passes,
)
from flags import benchmark as benchmark_flags
from flags.validation import FlagError
from official import distribute, precision

FORWARD, INPUT_GRADIENT, FULL_BACKWARD = 1.0, 1.0, 2.0
VANILLA_WORK = FORWARD + FULL_BACKWARD
ADVERSARIAL_WORK = (FORWARD + INPUT_GRADIENT) + 2 * (FORWARD + FULL_BACKWARD)
IDEAL_CONADV_OVER_VANILLA = VANILLA_WORK / ADVERSARIAL_WORK
#: The free attack: the update's two passes only (its input gradient is a by-product).
FREE_ATTACK_WORK = 2 * (FORWARD + FULL_BACKWARD)
IDEAL_FREE_CONADV_OVER_VANILLA = VANILLA_WORK / FREE_ATTACK_WORK
IDEAL_CLEAN_PASS_OVER_SEPARATE = ADVERSARIAL_WORK / FREE_ATTACK_WORK


def _device_name(device: str) -> str:
    if device in ("cpu", "gpu"):
        devices = tf.config.list_logical_devices(device.upper())
        if not devices:
            raise SystemExit(f"error: --device={device}: no such device on this machine")
        return devices[0].name
    return device


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a's speed over b's in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def _baselines(setting: Setting, passes) -> list[Setting]:
    """What a ConAdv setting is compared with: DisAdv (same source) and vanilla."""
    [disadv_pass] = update_passes(steps_lib.DISADV, setting.attack_source, [setting.update_pass])
    return [
        Setting(steps_lib.DISADV, disadv_pass, 1, setting.batch, setting.attack_source),
        Setting(steps_lib.VANILLA, passes[0], 1, setting.batch),
    ]


def ratios(rounds: dict[Setting, list[float]], fv) -> dict[str, float]:
    """ConAdv over DisAdv and vanilla, concatenated over separate, each τ over the first,
    and clean_pass over separate, per batch; each the median of per-round ratios."""
    passes, taus = fv.update_pass, [int(s) for s in fv.staleness]
    batches, sources = [int(b) for b in fv.batch_sizes], fv.attack_source

    def name(setting):
        return setting.key(passes, taus, batches, sources)

    out = {}
    for setting, speeds in rounds.items():
        others = []
        if setting.method == steps_lib.CONADV:
            others.extend(_baselines(setting, passes))
            if setting.staleness != taus[0]:
                others.append(dataclasses.replace(setting, staleness=taus[0]))
        if setting.method != steps_lib.VANILLA and setting.update_pass == "concatenated":
            others.append(dataclasses.replace(setting, update_pass="separate"))
        if setting.attack_source == steps_lib.CLEAN_PASS:
            # DisAdv's free attack has one update form; its separate attack has each.
            compared = passes if setting.method == steps_lib.DISADV else [setting.update_pass]
            others.extend(
                dataclasses.replace(setting, attack_source=steps_lib.SEPARATE_ATTACK, update_pass=p)
                for p in compared
            )
        for other in others:
            if other in rounds:
                label = f"{name(setting)}_over_{name(other)}"
                out[label] = median_ratio(speeds, rounds[other])
    return out


def ring_buffer_bytes_per_replica(fv, batch: int, staleness: int) -> int:
    """What ConAdv's ring holds per replica in this configuration (τ slots; the free
    attack's keeps no clean images)."""
    return ring_buffer.bytes_per_replica(
        staleness,
        batch,
        fv.image_size,
        precision.compute_dtype(fv.precision),
        clean_images=steps_lib.SEPARATE_ATTACK in fv.attack_source,
    )


def plot(result: dict, path: str):
    """Images/s against the per-replica batch per setting, and ConAdv's ratios per batch."""
    from conadv.studies import plots

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
        fv(["conadv-benchmark", *argv])
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
    batches, sources = [int(b) for b in fv.batch_sizes], fv.attack_source
    all_settings = settings(fv)
    tf.get_logger().addFilter(OwnFunctionsFilter)
    loops = []
    for setting in all_settings:
        print(f"building {setting.key(passes, taus, batches, sources)}", flush=True)
        loops.append(TimedLoop(setting, fv, strategy))
    speeds, order = interleaved_rounds(loops, fv.loops)
    rounds = dict(zip(all_settings, speeds))
    results = [
        {
            "key": setting.key(passes, taus, batches, sources),
            "series": setting.series(passes, taus, sources),
            "method": setting.method,
            "update_pass": setting.update_pass,
            "attack_source": setting.attack_source,
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
        for other in _baselines(setting, passes):
            if other in rounds:
                ratio_rows.append(
                    {
                        "series": f"{setting.series(passes, taus, sources)} / {other.method}",
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
        "attack_source",
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
        "ideal_clean_pass_conadv_over_vanilla": IDEAL_FREE_CONADV_OVER_VANILLA,
        "ideal_clean_pass_over_separate": IDEAL_CLEAN_PASS_OVER_SEPARATE,
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
    if steps_lib.CLEAN_PASS in fv.attack_source:
        print(
            "ideal from counted work with clean_pass: conadv_over_vanilla "
            f"{IDEAL_FREE_CONADV_OVER_VANILLA:.3f}, clean_pass_over_separate "
            f"{IDEAL_CLEAN_PASS_OVER_SEPARATE:.3f}"
        )
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
