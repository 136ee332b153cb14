"""Learning-rate schedules in steps: linear warmup, then poly, cosine or step decay.

Large-batch training needs a long warmup (the paper warms up for 40 of 90
epochs at 32k) and MLPerf decays with a power-2 polynomial. All schedules
share the warmup ``lr = peak·step/warmup_steps`` and are built from epochs ×
steps per epoch by ``build_schedule``.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

SCHEDULES = ("poly", "cosine", "step")


class _Warmup(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak_learning_rate: float, warmup_steps: int):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)

    def decay(self, step):
        """The learning rate at ``step`` ≥ warmup_steps (float32 tensor)."""
        raise NotImplementedError

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.warmup_steps == 0:
            return self.decay(step)
        warm = self.peak_learning_rate * step / float(self.warmup_steps)
        return tf.where(step < self.warmup_steps, warm, self.decay(step))

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate, "warmup_steps": self.warmup_steps}


class WarmupPolyDecay(_Warmup):
    """MLPerf: end + (peak − end)·(1 − (step − warmup)/(total − warmup))^power."""

    def __init__(
        self, peak_learning_rate, warmup_steps, total_steps, end_learning_rate=0.0, power=2.0
    ):
        super().__init__(peak_learning_rate, warmup_steps)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)
        self.power = float(power)

    def decay(self, step):
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        remaining = tf.pow(1.0 - progress, self.power)
        return (
            self.end_learning_rate + (self.peak_learning_rate - self.end_learning_rate) * remaining
        )

    def get_config(self):
        return {
            **super().get_config(),
            "total_steps": self.total_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
        }


class WarmupCosineDecay(_Warmup):
    """end + (peak − end)·½·(1 + cos(π·(step − warmup)/(total − warmup)))."""

    def __init__(self, peak_learning_rate, warmup_steps, total_steps, end_learning_rate=0.0):
        super().__init__(peak_learning_rate, warmup_steps)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)

    def decay(self, step):
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.end_learning_rate + (self.peak_learning_rate - self.end_learning_rate) * cosine

    def get_config(self):
        return {
            **super().get_config(),
            "total_steps": self.total_steps,
            "end_learning_rate": self.end_learning_rate,
        }


class WarmupStepDecay(_Warmup):
    """peak·decay_rate^k after the k-th boundary (in steps)."""

    def __init__(self, peak_learning_rate, warmup_steps, boundaries, decay_rate=0.1):
        super().__init__(peak_learning_rate, warmup_steps)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_rate = float(decay_rate)

    def decay(self, step):
        passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] or [0.0 * step])
        return self.peak_learning_rate * tf.pow(self.decay_rate, passed)

    def get_config(self):
        return {
            **super().get_config(),
            "boundaries": self.boundaries,
            "decay_rate": self.decay_rate,
        }


def build_schedule(
    name: str,
    peak_learning_rate: float,
    steps_per_epoch: int,
    train_steps: int,
    warmup_epochs: float,
    end_learning_rate: float = 0.0,
    power: float = 2.0,
    step_boundaries_epochs=(30, 60, 80),
    decay_rate: float = 0.1,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The ``--lr_schedule`` schedule, with epochs converted to steps."""
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), int(train_steps))
    if name == "poly":
        return WarmupPolyDecay(
            peak_learning_rate, warmup_steps, train_steps, end_learning_rate, power
        )
    if name == "cosine":
        return WarmupCosineDecay(peak_learning_rate, warmup_steps, train_steps, end_learning_rate)
    if name == "step":
        boundaries = [int(round(e * steps_per_epoch)) for e in step_boundaries_epochs]
        return WarmupStepDecay(peak_learning_rate, warmup_steps, boundaries, decay_rate)
    raise ValueError(f"unknown lr_schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def from_config(config, steps_per_epoch: int, train_steps: int):
    """``build_schedule`` from a training configuration's attributes (``lr_schedule``,
    ``learning_rate``, ``warmup_epochs``, ``end_learning_rate``, ``poly_power``): the one
    place that maps them, for the trainer, the dry run and the resume check alike."""
    return build_schedule(
        config.lr_schedule,
        peak_learning_rate=config.learning_rate,
        steps_per_epoch=steps_per_epoch,
        train_steps=train_steps,
        warmup_epochs=config.warmup_epochs,
        end_learning_rate=config.end_learning_rate,
        power=config.poly_power,
    )
