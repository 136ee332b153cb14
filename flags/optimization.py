"""Optimizer, learning-rate schedule and regularisation."""

from absl import flags as absl_flags


def define(fv):
    absl_flags.DEFINE_enum("optimizer", "lars", ["lars", "momentum"], "Optimizer.", flag_values=fv)
    absl_flags.DEFINE_float(
        "learning_rate", 20.0, "Peak learning rate (after warmup).", flag_values=fv
    )
    absl_flags.DEFINE_float("warmup_epochs", 2.0, "Linear warmup length.", flag_values=fv)
    absl_flags.DEFINE_enum(
        "lr_schedule", "poly", ["poly", "cosine", "step"], "Decay after warmup.", flag_values=fv
    )
    absl_flags.DEFINE_float("poly_power", 2.0, "Power of the poly decay.", flag_values=fv)
    absl_flags.DEFINE_float("end_learning_rate", 0.0001, "Final learning rate.", flag_values=fv)
    absl_flags.DEFINE_float(
        "weight_decay", 5e-4, "L2 weight decay (not on BN/bias).", flag_values=fv
    )
    absl_flags.DEFINE_float("momentum", 0.9, "Momentum.", flag_values=fv)
    absl_flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing.", flag_values=fv)
    absl_flags.DEFINE_float("lars_eta", 0.001, "LARS trust coefficient.", flag_values=fv)
