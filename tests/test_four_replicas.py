"""MirroredStrategy over 4 logical CPUs: ring buffer, its checkpoint, BatchNorm groups.

One child process (tests/four_replica_program.py) computes; the tests check
its numbers against NumPy and against what a wrong implementation would give.
"""

import os

import numpy as np
import tensorflow as tf

from tests.child_process import ROOT, run_for_result

EPSILON = 1e-5  # BatchNorm's
PAIR_TOLERANCE = 1e-4  # relative, 2 steps: float32 summation order differs


def _normalised(x):
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + EPSILON)


class FourReplicaTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.result = run_for_result("-m", "tests.four_replica_program", timeout=900)

    def test_four_replicas(self):
        self.assertEqual(self.result["replicas"], 4)

    def test_each_replica_reads_back_what_it_wrote_and_only_that(self):
        ring = self.result["ring"]
        # Written in two calls (slot 0 with base 1, slot 1 with base 2), read in later calls.
        self.assertEqual(ring["0"]["images"], [100.0, 101.0, 102.0, 103.0])
        self.assertEqual(ring["0"]["labels"], [10, 11, 12, 13])
        self.assertEqual(ring["0"]["adversarial"], [100.5, 101.5, 102.5, 103.5])
        self.assertEqual(ring["1"]["images"], [200.0, 201.0, 202.0, 203.0])
        self.assertEqual(ring["1"]["labels"], [20, 21, 22, 23])
        # Rewriting slot 0 leaves slot 1 alone.
        self.assertEqual(ring["slot0_after_rewrite"], [300.0, 301.0, 302.0, 303.0])
        self.assertEqual(ring["slot1_after_rewrite"], [200.0, 201.0, 202.0, 203.0])

    def test_checkpoint_restores_every_replica_slots_exactly(self):
        ckpt = self.result["checkpoint"]
        self.assertTrue(ckpt["fresh_was_empty"])
        self.assertTrue(ckpt["replicas_differ"])
        self.assertTrue(ckpt["exact"])
        self.assertTrue(ckpt["filled"])

    def test_ring_is_saved_per_replica_not_as_an_aggregate(self):
        ckpt = self.result["checkpoint"]
        prefix = f"ring_w0_{ckpt['layout']}/"
        expected = {f"{prefix}filled/.ATTRIBUTES/VARIABLE_VALUE": []}
        for name in ("images", "labels", "adversarial"):
            for replica in range(4):
                shape = [1, 2, 16, 16, 3] if name != "labels" else [1, 2]
                expected[f"{prefix}{name}_{replica}/.ATTRIBUTES/VARIABLE_VALUE"] = shape
        # Nothing else with "ring" in its name: the ON_READ variables are not saved.
        self.assertEqual(ckpt["keys"], expected)
        self.assertEqual(ckpt["component_shape"], [1, 2, 16, 16, 3])

    def test_no_replica_id_in_ring_buffer(self):
        with open(os.path.join(ROOT, "conadv", "ring_buffer.py")) as f:
            self.assertNotIn("replica_id_in_sync_group", f.read())

    def test_group_sizes_give_the_numpy_moments(self):
        groups = self.result["groups"]
        x = np.array(groups["x"], np.float32)
        shards = [x[2 * r : 2 * r + 2] for r in range(4)]
        own = np.concatenate([_normalised(s) for s in shards])
        pairs = np.concatenate([_normalised(x[0:4]), _normalised(x[4:8])])
        everyone = _normalised(x)
        self.assertAllClose(groups["group1"], own, atol=1e-4)
        self.assertAllClose(groups["group2"], pairs, atol=1e-4)
        self.assertAllClose(groups["group0"], everyone, atol=1e-4)
        # The three references differ, so each comparison can fail.
        self.assertGreater(np.abs(pairs - own).max(), 0.1)
        self.assertGreater(np.abs(pairs - everyone).max(), 0.1)
        # Without group statistics (the attack's call) every group size is local.
        for group in (0, 1, 2):
            self.assertAllClose(groups[f"group{group}_local"], own, atol=1e-4)

    def test_attack_on_replica_r_equals_single_device_attack_on_shard_r(self):
        attack = self.result["attack"]
        self.assertLess(attack["max_abs_diff"], 1e-3)
        self.assertGreater(attack["moved"], 7.9)  # ε = 8: the attack did move pixels
        # An attack through the pair's statistics would point elsewhere for many pixels.
        self.assertLess(attack["grouped_sign_agreement_with_local"], 0.95)

    def test_groups_of_two_train_like_pairs_on_one_device(self):
        pairs = self.result["pairs"]
        self.assertLess(pairs["pairs_vs_reference"], PAIR_TOLERANCE)
        self.assertGreater(pairs["singles_vs_reference"], 100 * PAIR_TOLERANCE)

    def test_concatenated_pass_with_groups_equals_two_passes(self):
        mixed = self.result["mixed"]
        self.assertLess(mixed["concatenated_vs_separate"], PAIR_TOLERANCE)
        self.assertGreater(mixed["moved"], 100 * PAIR_TOLERANCE)


if __name__ == "__main__":
    tf.test.main()
