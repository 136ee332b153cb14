"""The network."""

from absl import flags as absl_flags


def define(fv):
    absl_flags.DEFINE_string(
        "model",
        "resnet20",
        "resnet18/34/50/101/152/200 (ImageNet) or resnet20/32/44/56/110.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float("width_multiplier", 1.0, "Scales every layer's width.", flag_values=fv)
    absl_flags.DEFINE_bool(
        "sync_batch_norm", True, "Reduce BatchNorm statistics over all replicas.", flag_values=fv
    )
