"""absl flags of ``conadv-benchmark`` and their validation.

Defined on a ``FlagValues`` of the benchmark's own (not absl's global
``FLAGS``), so the benchmark can run inside another program, a test or a
notebook, beside ``main.py``'s flags.
"""

from __future__ import annotations

from absl import flags as absl_flags

from flags import method
from flags.validation import FlagError, distinct_numbers


def define(fv: absl_flags.FlagValues):
    absl_flags.DEFINE_string("model", "resnet20", "Network (see main.py --model).", flag_values=fv)
    absl_flags.DEFINE_float("width_multiplier", 1.0, "Scales every layer's width.", flag_values=fv)
    absl_flags.DEFINE_integer("image_size", 32, "Image side in pixels.", flag_values=fv)
    absl_flags.DEFINE_integer("num_classes", 10, "Classes of the synthetic data.", flag_values=fv)
    absl_flags.DEFINE_list(
        "batch_sizes",
        ["256"],
        "Per-replica batch sizes to time every method at (the global batch is this times "
        "the replicas), e.g. 16,32,64,128,256.",
        flag_values=fv,
    )
    absl_flags.DEFINE_string("device", "cpu", "cpu, gpu or a device name.", flag_values=fv)
    absl_flags.DEFINE_integer(
        "steps_per_loop", 3, "Steps in one compiled loop (one timing).", flag_values=fv
    )
    absl_flags.DEFINE_integer(
        "loops",
        5,
        "Timed rounds after the warm-up; a round times one loop of every setting in turn.",
        flag_values=fv,
    )
    absl_flags.DEFINE_list("methods", list(method.METHODS), "Methods.", flag_values=fv)
    absl_flags.DEFINE_float("attack_eps", 4.0, "Attack budget in pixels.", flag_values=fv)
    absl_flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA.", flag_values=fv)
    absl_flags.DEFINE_string(
        "precision", "float32", "float32, mixed_bfloat16 or mixed_float16.", flag_values=fv
    )
    absl_flags.DEFINE_integer(
        "bn_group_size",
        None,
        "Replicas per BatchNorm statistic (default: the smallest group of >= 64 examples).",
        flag_values=fv,
    )
    absl_flags.DEFINE_list(
        "update_pass",
        ["concatenated"],
        "concatenated (one pass of 2B rows) and/or separate (two passes of B).",
        flag_values=fv,
    )
    absl_flags.DEFINE_list(
        "staleness", ["1"], "τ values to time ConAdv at, e.g. 1,8,32.", flag_values=fv
    )
    absl_flags.DEFINE_list(
        "attack_source",
        ["separate"],
        "separate (the attack's own passes) and/or clean_pass (the free attack, from the "
        "clean pass's input gradient) for DisAdv and ConAdv.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "num_cpu_devices", 1, "> 1: split the CPU and run under MirroredStrategy.", flag_values=fv
    )
    absl_flags.DEFINE_string("output_json", None, "Write the results here.", flag_values=fv)
    absl_flags.DEFINE_string(
        "plot",
        None,
        "Write a PNG of images/s against the per-replica batch, and the ConAdv/DisAdv ratio.",
        flag_values=fv,
    )


def _require(condition: bool, message: str):
    if not condition:
        raise FlagError(message)


def validate(fv: absl_flags.FlagValues):
    """Checks the parsed flags; raises ``FlagError`` with one line naming the flag."""
    from flags.method import ATTACK_SOURCES, METHODS, UPDATE_PASSES
    from official import precision, resnet

    _require(
        fv.model in resnet.MODEL_NAMES,
        f"--model={fv.model} is unknown; choose one of {', '.join(resnet.MODEL_NAMES)}",
    )
    _require(
        fv.precision in precision.POLICIES,
        f"--precision={fv.precision} is not one of {', '.join(precision.POLICIES)}",
    )
    for name in fv.methods:
        _require(
            name in METHODS,
            f"--methods: {name!r} is not one of {', '.join(METHODS)}",
        )
    for name in fv.update_pass:
        _require(
            name in UPDATE_PASSES,
            f"--update_pass: {name!r} is not one of {', '.join(UPDATE_PASSES)}",
        )
    for name in fv.attack_source:
        _require(
            name in ATTACK_SOURCES,
            f"--attack_source: {name!r} is not one of {', '.join(ATTACK_SOURCES)}",
        )
    _require(len(set(fv.attack_source)) == len(fv.attack_source), "--attack_source: a source twice")
    distinct_numbers("staleness", fv.staleness)
    distinct_numbers("batch_sizes", fv.batch_sizes)
    _require(fv.num_cpu_devices >= 1, "--num_cpu_devices must be at least 1")
    _require(
        fv.steps_per_loop >= 1 and fv.loops >= 1, "--steps_per_loop and --loops must be positive"
    )
    group = fv.bn_group_size
    _require(
        group is None or (group >= 0 and (group == 0 or fv.num_cpu_devices % group == 0)),
        f"--bn_group_size={group} must be 0 or divide the {fv.num_cpu_devices} replicas",
    )
