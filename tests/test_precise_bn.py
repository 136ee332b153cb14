"""Precise BatchNorm statistics (official/precise_bn.py) against NumPy.

The 2-replica case runs in tests/mirrored_program.py (tests/test_mirrored.py).
"""

import tensorflow as tf

from tests import precise_bn_checks

#: float32 sums of ~100 values against a float64 reference.
TOLERANCE = 1e-5


class PreciseBatchNormTest(tf.test.TestCase):
    def test_population_statistics_of_the_batches_used(self):
        """Catches: an EMA (or an average of per-batch variances, which misses the spread
        of the batch means) in place of population moments; a forward pass normalising with
        the moving statistics (set wrong here) instead of batch statistics; a batch too many
        or too few; the moving averages not put back afterwards."""
        result = precise_bn_checks.check(
            tf.distribute.get_strategy(), batches_in_data=4, batches_used=3
        )
        self.assertLess(result["max_rel_error"], TOLERANCE)
        self.assertEqual(result["batches"], 3)
        self.assertEqual(result["examples"], 3 * 8)
        self.assertTrue(result["aux_untouched"])
        self.assertTrue(result["moving_restored"])

    def test_stops_at_the_end_of_the_data(self):
        result = precise_bn_checks.check(
            tf.distribute.get_strategy(), batches_in_data=2, batches_used=50
        )
        self.assertLess(result["max_rel_error"], TOLERANCE)
        self.assertEqual(result["batches"], 2)


if __name__ == "__main__":
    tf.test.main()
