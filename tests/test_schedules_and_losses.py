"""Learning-rate schedules against closed forms; loss and top-k against NumPy."""

import math

import numpy as np
import tensorflow as tf

from official import losses, schedules


class ScheduleTest(tf.test.TestCase):
    def test_poly_with_warmup(self):
        peak, end, warm, total = 35.0, 1e-4, 40, 90
        s = schedules.build_schedule(
            "poly",
            peak,
            steps_per_epoch=1,
            train_steps=total,
            warmup_epochs=warm,
            end_learning_rate=end,
            power=2.0,
        )
        for step, want in [
            (0, 0.0),
            (20, peak * 20 / 40),
            (40, peak),
            (65, end + (peak - end) * (1 - 25 / 50) ** 2),
            (89, end + (peak - end) * (1 - 49 / 50) ** 2),
            (90, end),
        ]:
            self.assertAllClose(float(s(step)), want, rtol=1e-6, msg=str(step))

    def test_poly_uses_its_configured_power(self):
        """Catches a poly decay that ignores ``power`` (e.g. always squares): powers
        other than 2 against the closed form, through ``build_schedule`` and after a
        ``get_config`` round trip."""
        peak, end, warm, total = 4.0, 0.01, 10, 60
        for power in (0.5, 1.0, 3.0):
            s = schedules.build_schedule(
                "poly",
                peak,
                steps_per_epoch=2,
                train_steps=total,
                warmup_epochs=warm / 2,
                end_learning_rate=end,
                power=power,
            )
            rebuilt = schedules.WarmupPolyDecay(**s.get_config())
            for step in (5, 10, 17, 35, 59, 60):
                if step < warm:
                    want = peak * step / warm
                else:
                    want = end + (peak - end) * (1 - (step - warm) / (total - warm)) ** power
                for schedule in (s, rebuilt):
                    self.assertAllClose(
                        float(schedule(step)), want, rtol=1e-6, msg=f"power {power}, step {step}"
                    )

    def test_cosine(self):
        s = schedules.build_schedule(
            "cosine",
            2.0,
            steps_per_epoch=10,
            train_steps=100,
            warmup_epochs=1,
            end_learning_rate=0.0,
        )
        for step, want in [
            (0, 0.0),
            (5, 1.0),
            (10, 2.0),
            (55, 1.0),
            (99, 1.0 * (1 + math.cos(math.pi * 89 / 90))),
        ]:
            self.assertAllClose(float(s(step)), want, rtol=1e-5, atol=1e-7, msg=str(step))

    def test_step_decay(self):
        s = schedules.build_schedule(
            "step",
            1.0,
            steps_per_epoch=10,
            train_steps=900,
            warmup_epochs=5,
            step_boundaries_epochs=(30, 60, 80),
        )
        for step, want in [
            (0, 0.0),
            (25, 0.5),
            (50, 1.0),
            (299, 1.0),
            (300, 0.1),
            (650, 0.01),
            (899, 0.001),
        ]:
            self.assertAllClose(float(s(step)), want, rtol=1e-5, msg=str(step))

    def test_no_warmup_and_inside_tf_function(self):
        s = schedules.WarmupPolyDecay(1.0, 0, 10)
        self.assertAllClose(float(tf.function(s)(tf.constant(0, tf.int64))), 1.0)
        self.assertAllClose(float(s(5)), 0.25)

    def test_unknown(self):
        with self.assertRaisesRegex(ValueError, "poly"):
            schedules.build_schedule("linear", 1.0, 1, 10, 0)


class LossTest(tf.test.TestCase):
    def test_cross_entropy_with_label_smoothing(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
        labels = rng.integers(0, 5, 6)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        for s in (0.0, 0.1):
            targets = np.full((6, 5), s / 5) + (1 - s) * np.eye(5)[labels]
            want = -(targets * logp).sum(1)
            self.assertAllClose(losses.cross_entropy(labels, logits, s), want, rtol=1e-5)

    def test_top_k(self):
        logits = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3], [3, 2, 1, 0, -1, -2]], np.float32)
        labels = np.array([1, 5])
        self.assertAllEqual(losses.top_k_correct(labels, logits, 1), [0.0, 0.0])
        self.assertAllEqual(losses.top_k_correct(labels, logits, 2), [1.0, 0.0])
        self.assertAllEqual(losses.top_k_correct(labels, logits, 5), [1.0, 0.0])
        self.assertAllEqual(losses.top_k_correct(labels, logits, 6), [1.0, 1.0])


if __name__ == "__main__":
    tf.test.main()
