"""Step throughput of vanilla, DisAdv and ConAdv on one device.

    python -m conadv.benchmark --model resnet20 --image_size 32 --batch_size 256
    python -m conadv.benchmark --update_pass concatenated,separate --methods conadv
    python -m conadv.benchmark --precision mixed_bfloat16 --num_cpu_devices 2 --bn_group_size 1
    python -m conadv.benchmark --methods conadv --staleness 1,8,32

Each method runs the trainer's own compiled loop on synthetic in-device
batches; after a warm-up loop, several loops are timed and the median is
reported as clean images per second. The ideal ConAdv/vanilla ratio counts
work in forward-pass units: a forward pass costs 1, an input-gradient
backward pass 1 (activations only) and a full backward pass 2 (activations
and weights). Vanilla does 3 per image; ConAdv does 2 (the attack on B) plus
6 (the update on 2B) per clean image; DisAdv does the same work as ConAdv but
in two dependent halves, so ConAdv can beat it only where the processor has
room to run both halves at once.

``--update_pass`` times the adversarial update as one pass over 2B rows
(concatenated) and as two passes of B rows (separate); ``--num_cpu_devices``
splits the CPU to run the step under MirroredStrategy (with its BatchNorm
group collectives). ``--staleness`` times ConAdv at each listed τ (its ring
holds τ batches per replica; a step reads and writes one of them, so the
speed should not depend on τ). The ring buffer's bytes per replica are
printed for each τ (in ``--output_json``: ``ring_buffer_bytes_per_replica``
for the largest, ``ring_buffer_bytes_per_replica_by_staleness`` for each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import tensorflow as tf

from conadv import attack as attack_lib
from conadv import ring_buffer
from conadv import steps as steps_lib
from conadv.metrics import ReplicaSums
from conadv.ring_buffer import RingBuffer
from official import distribute, optimizers, precision, resnet
from official import split_batch_norm as bn_lib

FORWARD, INPUT_GRADIENT, FULL_BACKWARD = 1.0, 1.0, 2.0
VANILLA_WORK = FORWARD + FULL_BACKWARD
ADVERSARIAL_WORK = (FORWARD + INPUT_GRADIENT) + 2 * (FORWARD + FULL_BACKWARD)
IDEAL_CONADV_OVER_VANILLA = VANILLA_WORK / ADVERSARIAL_WORK


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256, help="global batch")
    parser.add_argument("--device", default="cpu", help="cpu, gpu or a device name")
    parser.add_argument("--steps_per_loop", type=int, default=3)
    parser.add_argument("--loops", type=int, default=5, help="timed loops after warm-up")
    parser.add_argument("--methods", default="vanilla,disadv,conadv")
    parser.add_argument("--attack_eps", type=float, default=4.0)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--precision", default="float32", choices=precision.POLICIES)
    parser.add_argument(
        "--bn_group_size",
        type=int,
        default=None,
        help="replicas per BatchNorm statistic (default: smallest group of >= 64 examples)",
    )
    parser.add_argument(
        "--update_pass",
        default="concatenated",
        help="comma-separated: concatenated (one pass of 2B) and/or separate (two of B)",
    )
    parser.add_argument(
        "--staleness", default="1", help="comma-separated τ values to time ConAdv at, e.g. 1,8,32"
    )
    parser.add_argument(
        "--num_cpu_devices",
        type=int,
        default=1,
        help="> 1: split the CPU and run under MirroredStrategy",
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    for name in args.update_pass.split(","):
        if name not in steps_lib.UPDATE_PASSES:
            parser.error(
                f"--update_pass: {name!r} is not one of {', '.join(steps_lib.UPDATE_PASSES)}"
            )
    if args.num_cpu_devices < 1:
        parser.error("--num_cpu_devices must be at least 1")
    args.staleness = _staleness_list(parser, args.staleness)
    if args.bn_group_size is not None and (
        args.bn_group_size < 0 or (args.bn_group_size and args.num_cpu_devices % args.bn_group_size)
    ):
        parser.error(
            f"--bn_group_size={args.bn_group_size} must be 0 or divide the "
            f"{args.num_cpu_devices} replicas"
        )
    if args.batch_size % args.num_cpu_devices:
        parser.error(f"--batch_size must be divisible by --num_cpu_devices={args.num_cpu_devices}")
    if args.model not in resnet.MODEL_NAMES:
        parser.error(
            f"--model={args.model} is unknown; choose one of {', '.join(resnet.MODEL_NAMES)}"
        )
    for name in args.methods.split(","):
        if name not in steps_lib.METHODS:
            parser.error(f"--methods: {name!r} is not one of {', '.join(steps_lib.METHODS)}")
    if args.batch_size < 1 or args.steps_per_loop < 1 or args.loops < 1:
        parser.error("--batch_size, --steps_per_loop and --loops must be positive")
    return args


def _staleness_list(parser, text: str) -> list[int]:
    """``--staleness`` as distinct positive integers, in the order given."""
    values = []
    for name in text.split(","):
        if not name.strip().isdigit() or int(name) < 1:
            parser.error(f"--staleness: {name!r} is not a positive integer (e.g. 1,8,32)")
        if int(name) in values:
            parser.error(f"--staleness: {int(name)} is listed twice")
        values.append(int(name))
    return values


def _device_name(device: str) -> str:
    if device in ("cpu", "gpu"):
        devices = tf.config.list_logical_devices(device.upper())
        if not devices:
            raise SystemExit(f"error: --device={device}: no such device on this machine")
        return devices[0].name
    return device


def bn_group_size(args, replicas: int) -> int:
    if args.bn_group_size is not None:
        return bn_lib.check_group_size(args.bn_group_size, replicas)
    return bn_lib.default_group_size(args.batch_size // replicas, replicas)[0]


def measure(method: str, args, strategy, update_pass: str, staleness: int = 1) -> float:
    """Median clean images per second of ``method`` over the timed loops (ConAdv at τ).

    ``staleness`` is τ, the number of batches ConAdv's ring holds per replica.
    """
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = resnet.resnet(
            args.model,
            num_classes=args.num_classes,
            image_size=args.image_size,
            width_multiplier=args.width_multiplier,
            bn_group_size=bn_group_size(args, replicas),
            dtype_policy=args.precision,
        )
        optimizer = optimizers.build_optimizer("lars", learning_rate=0.1, weight_decay=5e-4)
        if precision.needs_loss_scaling(args.precision):
            optimizer = precision.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        sums = ReplicaSums(steps_lib.TRAIN_SUMS)
    ring = None
    compute_dtype = precision.compute_dtype(args.precision)
    if method == steps_lib.CONADV:
        ring = RingBuffer(
            strategy,
            staleness,
            args.batch_size // replicas,
            args.image_size,
            dtype=compute_dtype,
        )
    ctx = steps_lib.StepContext(
        model=model,
        optimizer=optimizer,
        global_batch_size=args.batch_size,
        num_classes=args.num_classes,
        label_smoothing=0.1,
        attack=attack_lib.AttackConfig(eps=args.attack_eps),
        sums=sums,
        ring=ring,
        update_pass=update_pass,
        compute_dtype=compute_dtype,
    )
    shape = [args.batch_size, args.image_size, args.image_size, 3]
    images = tf.random.stateless_uniform(shape, [1, 2], 0.0, 255.0)
    labels = tf.random.stateless_uniform(
        [args.batch_size], [3, 4], 0, args.num_classes, dtype=tf.int32
    )
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    replica_step = tf.function(steps_lib.build_step(method, ctx), jit_compile=args.jit_compile)

    @tf.function
    def loop(it, n):
        for _ in tf.range(n):
            strategy.run(replica_step, args=(next(it),))

    if ring is not None:
        prologue = steps_lib.build_conadv_prologue(ctx)

        @tf.function
        def fill(it, k):
            strategy.run(prologue, args=(next(it), k))

        for k in range(staleness):
            fill(iterator, tf.constant(k, tf.int64))
    n = tf.constant(args.steps_per_loop)
    loop(iterator, n)  # warm-up: tracing and the first execution
    sums.totals()
    rates = []
    for _ in range(args.loops):
        start = time.perf_counter()
        loop(iterator, n)
        float(optimizer.iterations.numpy())  # waits for the loop's last update
        rates.append(args.steps_per_loop * args.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def ring_buffer_bytes_per_replica(args, replicas: int, staleness: int) -> int:
    """What ConAdv's ring holds per replica in this configuration (τ slots)."""
    return ring_buffer.bytes_per_replica(
        staleness,
        args.batch_size // replicas,
        args.image_size,
        precision.compute_dtype(args.precision),
    )


def rate_key(method: str, update_pass: str, staleness: int, passes, stalenesses) -> str:
    """The name a timing is reported under: the method and what varies between its timings."""
    key = method
    if len(passes) > 1 and method != steps_lib.VANILLA:
        key += f"/{update_pass}"
    if len(stalenesses) > 1 and method == steps_lib.CONADV:
        key += f"/tau={staleness}"
    return key


def ratios(rates: dict, passes, stalenesses) -> dict:
    """Speed ratios between the timed methods, passes and (ConAdv's) staleness values."""
    out = {}
    taus = [f"/tau={s}" for s in stalenesses] if len(stalenesses) > 1 else [""]
    for tau in taus:
        conadv = f"conadv{tau}"
        for other in ("disadv", "vanilla"):
            if conadv in rates and other in rates:
                out[f"{conadv}_over_{other}"] = rates[conadv] / rates[other]
    for method, suffixes in ((steps_lib.DISADV, [""]), (steps_lib.CONADV, taus)):
        for suffix in suffixes:
            concat, separate = f"{method}/concatenated{suffix}", f"{method}/separate{suffix}"
            if concat in rates and separate in rates:
                out[f"{method}{suffix}_concatenated_over_separate"] = (
                    rates[concat] / rates[separate]
                )
    first, *rest = stalenesses
    for update_pass in passes if len(passes) > 1 else [None]:
        prefix = "conadv" if update_pass is None else f"conadv/{update_pass}"
        for staleness in rest:
            slow, base = f"{prefix}/tau={staleness}", f"{prefix}/tau={first}"
            if slow in rates and base in rates:
                out[f"{slow}_over_tau={first}"] = rates[slow] / rates[base]
    return out


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.num_cpu_devices > 1:
        distribute.configure_cpu_devices(args.num_cpu_devices)
        strategy = distribute.get_strategy("mirrored", args.num_cpu_devices)
    else:
        strategy = tf.distribute.OneDeviceStrategy(_device_name(args.device))
    replicas = strategy.num_replicas_in_sync
    methods = args.methods.split(",")
    passes = args.update_pass.split(",")
    rates = {}
    for method in methods:
        for update_pass in passes if method != steps_lib.VANILLA else passes[:1]:
            for staleness in args.staleness if method == steps_lib.CONADV else [1]:
                key = rate_key(method, update_pass, staleness, passes, args.staleness)
                rates[key] = measure(method, args, strategy, update_pass, staleness)
    ring_bytes = {
        str(staleness): ring_buffer_bytes_per_replica(args, replicas, staleness)
        for staleness in args.staleness
    }
    result = {
        "config": {
            key: getattr(args, key)
            for key in (
                "model",
                "width_multiplier",
                "image_size",
                "batch_size",
                "device",
                "steps_per_loop",
                "loops",
                "jit_compile",
                "precision",
                "update_pass",
                "staleness",
                "num_cpu_devices",
            )
        },
        "replicas": replicas,
        "bn_group_size": bn_group_size(args, replicas),
        "ring_buffer_bytes_per_replica": ring_bytes[str(max(args.staleness))],
        "ring_buffer_bytes_per_replica_by_staleness": ring_bytes,
        "methods": {m: {"images_per_second": r} for m, r in rates.items()},
        "ratios": ratios(rates, passes, args.staleness),
        "ideal_conadv_over_vanilla": IDEAL_CONADV_OVER_VANILLA,
    }

    where = args.device if replicas == 1 else f"{replicas} logical CPU replicas"
    print(
        f"{args.model} at {args.image_size}px, global batch {args.batch_size}, "
        f"{where}, {args.precision}, jit={args.jit_compile}, "
        f"BatchNorm group {result['bn_group_size']}: median of {args.loops} loops "
        f"of {args.steps_per_loop} steps"
    )
    width = max(24, *(len(key) + 2 for key in rates))
    print(f"{'method':<{width}}{'clean img/s':>14}")
    for method, rate in rates.items():
        print(f"{method:<{width}}{rate:>14.1f}")
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.3f}")
    print(f"ideal conadv_over_vanilla from counted work: {IDEAL_CONADV_OVER_VANILLA:.3f}")
    for staleness, size in ring_bytes.items():
        print(
            f"ring buffer: {size} bytes per replica "
            f"(τ = {staleness}, {args.batch_size // replicas} images per replica)"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
