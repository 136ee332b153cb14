"""Mixed-precision helpers: rounding inside the ε-ball, and XLA-identical random starts."""

import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from official import precision


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


if __name__ == "__main__":
    tf.test.main()
