"""Mixed precision and XLA: rounding inside the ε-ball, XLA-identical random starts, and
ConAdv steps in bfloat16, float16 and under XLA that update like float32 ones."""

import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from official import precision
from tests import method_testing as mt


class RoundWithinTest(tf.test.TestCase):
    def test_stays_in_bounds_where_nearest_rounding_does_not(self):
        rng = np.random.default_rng(0)
        eps = 3.0
        for dtype in (tf.bfloat16, tf.float16):
            clean = tf.cast(tf.cast(rng.uniform(0, 255, 20000), dtype), tf.float32).numpy()
            lower, upper = np.maximum(clean - eps, 0), np.minimum(clean + eps, 255)
            x = np.clip(clean + rng.uniform(-1.5 * eps, 1.5 * eps, clean.shape), lower, upper)
            x = x.astype(np.float32)
            got = precision.round_within(tf.constant(x), lower, upper, dtype).numpy()
            nearest = tf.cast(tf.cast(x, dtype), tf.float32).numpy()
            self.assertTrue(np.all((got >= lower) & (got <= upper)), dtype)
            # Representable in dtype, and at most one step from x.
            self.assertAllEqual(tf.cast(tf.cast(got, dtype), tf.float32).numpy(), got)
            step = 1.0 if dtype == tf.bfloat16 else 0.125  # spacing at 128–255
            self.assertLessEqual(np.abs(got - x).max(), step)
            # Where nearest rounding stays inside, it is what we get.
            inside = (nearest >= lower) & (nearest <= upper)
            self.assertAllEqual(got[inside], nearest[inside])
            if dtype == tf.bfloat16:
                self.assertGreater(np.sum(~inside), 0)  # the case the function exists for

    def test_same_under_xla(self):
        x = np.linspace(0, 255, 1001, dtype=np.float32)
        lower, upper = np.maximum(x - 2.3, 0), np.minimum(x + 2.3, 255)
        fn = tf.function(
            lambda: precision.round_within(tf.constant(x), lower, upper, tf.bfloat16),
            jit_compile=True,
        )
        self.assertAllEqual(
            fn().numpy(), precision.round_within(tf.constant(x), lower, upper, tf.bfloat16)
        )


class StatelessUniformTest(tf.test.TestCase):
    def test_range_uniformity_and_xla(self):
        seed = tf.constant([3, 11], tf.int64)
        draw = attack_lib.stateless_uniform([200000], seed, -8.0, 8.0).numpy()
        self.assertGreaterEqual(draw.min(), -8.0)
        self.assertLess(draw.max(), 8.0)
        counts, _ = np.histogram(draw, bins=16, range=(-8, 8))
        expected = len(draw) / 16
        chi2 = np.sum((counts - expected) ** 2 / expected)
        self.assertLess(chi2, 37.7)  # χ² with 15 degrees of freedom, p = 0.001
        self.assertAllClose(draw.mean(), 0.0, atol=0.05)
        compiled = tf.function(
            lambda: attack_lib.stateless_uniform([200000], seed, -8.0, 8.0), jit_compile=True
        )
        self.assertAllClose(compiled().numpy(), draw, atol=1e-5)
        # Another seed gives other numbers.
        other = attack_lib.stateless_uniform([200000], seed + 1, -8.0, 8.0).numpy()
        self.assertGreater(np.abs(other - draw).mean(), 1.0)


class UpdateLikeFloat32Test(tf.test.TestCase):
    """Two ConAdv steps (attack, 16-bit ring, adversarial update) in bfloat16 and in
    float16 with loss scaling, against the same steps in float32, from the same
    weights (XLA against the default path: tests/test_steps.py XlaTest).

    Compared: the update of the trainable variables, Δ = after − before
    (``mt.update_error``), not the variables — BatchNorm's moving
    statistics move even when no update is applied. A skipped update, a
    doubled one or one divided by the loss scale gives an error of about 1,
    one left multiplied by the loss scale far more. Tolerances (measured
    errors in brackets):
    bfloat16 (8 significant bits) 0.1 [0.013]; float16 (11 bits) 0.02
    [0.0005].
    """

    STEPS = 2

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.images, cls.labels = mt.fixed_batches(cls.STEPS + 1, 8, seed=31)
        cls.initial, cls.reference = cls.train(precision.FLOAT32)

    @classmethod
    def train(cls, dtype_policy, jit_compile=False):
        """Initial and final trainable weights of STEPS ConAdv steps (τ = 1)."""
        model = mt.small_model(seed=6, width=0.25, dtype_policy=dtype_policy)
        ctx = mt.make_context(
            model, weight_decay=5e-4, staleness=1, batch_size=8, dtype_policy=dtype_policy
        )
        iterator = mt.batch_iterator(cls.images, cls.labels)
        mt.fill_ring(ctx, iterator)
        run = mt.step_runner(ctx, "conadv", jit_compile=jit_compile)
        initial = mt.trainable_snapshot(model)
        for _ in range(cls.STEPS):
            run(iterator)
        return initial, mt.trainable_snapshot(model)

    def check(self, dtype_policy, tolerance, jit_compile=False):
        initial, final = self.train(dtype_policy, jit_compile)
        for a, b in zip(initial, self.initial):
            self.assertAllEqual(a, b)  # the same starting point
        self.assertTrue(all(np.all(np.isfinite(v)) for v in final))
        self.assertLess(mt.update_error(initial, final, self.reference), tolerance)
        # The float32 steps did move the trainable weights, so the check can fail.
        moved = max(np.max(np.abs(b - a)) for a, b in zip(self.initial, self.reference))
        self.assertGreater(moved, 1e-3)

    def test_bfloat16(self):
        self.check(precision.MIXED_BFLOAT16, 0.1)

    def test_float16_with_loss_scaling(self):
        self.check(precision.MIXED_FLOAT16, 0.02)

    # XLA: tests/test_steps.py XlaTest compares every variable of all three methods
    # against the default path at 1e-4, which covers ConAdv here at 1e-3.


if __name__ == "__main__":
    tf.test.main()
