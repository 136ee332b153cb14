"""The network."""

from absl import flags as absl_flags


def define(fv):
    absl_flags.DEFINE_string(
        "model",
        "resnet20",
        "resnet18/34/50/101/152/200 (ImageNet) or resnet8/20/32/44/56/110.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float("width_multiplier", 1.0, "Scales every layer's width.", flag_values=fv)
    absl_flags.DEFINE_integer(
        "bn_group_size",
        None,
        "Replicas whose batches make one BatchNorm statistic: 1 = each replica's own "
        "(the paper's per-worker BatchNorm), k = groups of k consecutive replicas, "
        "0 = all replicas. Default: the smallest group with >= 64 examples per statistic. "
        "The attack always uses each replica's own statistics.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "bn_momentum",
        0.9,
        "BatchNorm moving statistics: moving = momentum*moving + (1 - momentum)*batch.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "precise_bn_batches",
        200,
        "Before every evaluation and export, replace the main branch's moving BatchNorm "
        "statistics by the population statistics of this many batches of training images "
        "(evaluation preprocessing) under the current weights (PreciseBN); one pass of the "
        "training set at most. Training keeps its moving averages. 0: evaluate with the "
        "moving averages.",
        flag_values=fv,
    )
