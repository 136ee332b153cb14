"""MirroredStrategy over 2 logical CPU devices (in a child process, see mirrored_program)."""

import tensorflow as tf

from tests import test_precise_bn
from tests.child_process import run_for_result

SYNC_TOLERANCE = 1e-4  # relative, after 3 steps: float32 summation order differs
#: mt.update_error after 2 steps (float32 order; measured 2e-7). A loss divided
#: by the replica's batch instead of the global one doubles each step (error ≈ 1).
UPDATE_TOLERANCE = 1e-3


class MirroredTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The child took 556 s (173 s of CPU) on a shared, loaded 2-core machine.
        cls.result = run_for_result("-m", "tests.mirrored_program", timeout=900)

    def test_all_methods_run_on_two_replicas(self):
        self.assertEqual(self.result["replicas"], 2)
        for method in ("vanilla", "disadv", "conadv"):
            info = self.result["methods"][method]
            self.assertEqual(info["steps"], 2, method)
            self.assertTrue(info["finite"], method)
            self.assertEqual(info["examples"], 16, method)  # 2 steps × global batch 8

    def test_adversarial_methods_update_like_one_device_over_the_global_batch(self):
        """DisAdv and ConAdv on 2 replicas against one device that attacks each
        replica's half with that half's statistics and steps on the loss summed
        over both halves, divided by the global batch (mirrored_program.py)."""
        for method in ("disadv", "conadv"):
            info = self.result["methods"][method]
            self.assertLess(info["update_error"], UPDATE_TOLERANCE, method)
            # The reference did step (a skipped step would give an error of 1).
            self.assertGreater(info["reference_moved"], 1e-3, method)

    def test_each_replica_ring_holds_its_own_shard(self):
        self.assertEqual(self.result["ring_replica_images_match"], [True, True])
        self.assertTrue(self.result["ring_replicas_differ"])

    def test_synchronized_vanilla_matches_single_device(self):
        self.assertLess(self.result["sync_vs_single_max_rel_diff"], SYNC_TOLERANCE)
        # Without synchronisation the per-replica statistics differ: the check can fail.
        self.assertGreater(self.result["unsync_vs_single_max_rel_diff"], 10 * SYNC_TOLERANCE)

    def test_precise_batch_norm_sums_both_replicas(self):
        """Catches: population statistics of one replica's shards only (sums not reduced
        across replicas), or of the global batch normalised as one (each replica's forward
        pass normalises its shard with its own moments); the moving averages not restored."""
        result = self.result["precise_bn"]
        self.assertLess(result["max_rel_error"], test_precise_bn.TOLERANCE)
        self.assertEqual(result["batches"], 3)
        self.assertEqual(result["examples"], 3 * 16)  # both replicas' examples
        self.assertTrue(result["aux_untouched"])
        self.assertTrue(result["moving_restored"])

    def test_gradient_accumulation_on_two_replicas(self):
        # Frozen BatchNorm: two micro-batches per step update like one batch.
        self.assertLess(self.result["accumulation_frozen_max_rel_diff"], SYNC_TOLERANCE)
        # ConAdv with group BatchNorm (its collectives run in every micro-step).
        info = self.result["accumulation_conadv"]
        self.assertEqual(info["steps"], 2)
        self.assertTrue(info["finite"])
        self.assertEqual(info["examples"], 16)  # 2 steps x global batch 8
        self.assertEqual(info["ring_slots"], 2)  # τ·N
        self.assertEqual(info["ring_holds_step_2"], [True] * 4)

    def test_keras_fit_on_two_replicas_matches_one_device(self):
        """ConAdvModel.fit under MirroredStrategy with steps_per_execution 2 (frozen
        BatchNorm, no random start) against one device on the same global batch.

        Catches: a loss divided by the replica's batch, metrics read from one
        replica, a ring shared by the replicas or written to the wrong slot, a
        steps_per_execution loop that drops or repeats steps."""
        info = self.result["keras_fit"]
        self.assertEqual(info["iterations"], [4, 4])
        self.assertGreater(info["single_moved"], 1e-3)
        self.assertLess(info["max_weight_diff"], 1e-5)
        mirrored, single = info["history"]
        self.assertEqual(set(mirrored), {"loss", "clean_loss", "adv_loss", "accuracy"})
        for key in single:
            self.assertAllClose(mirrored[key], single[key], rtol=1e-5, msg=key)
        mirrored, single = info["batch_logs"]
        self.assertEqual(set(mirrored), set(single))
        for key in single:
            self.assertAllClose(mirrored[key], single[key], rtol=1e-5, msg=key)
        self.assertEqual(info["ring_rows_match"], [True] * 4)

    def test_keras_fit_with_live_batch_norm_matches_the_two_shards(self):
        """ConAdvModel.fit, ConAdv with BatchNorm training, on 2 replicas against an eager
        computation of the same two shards (test_keras_model.reference_run).

        Catches: BatchNorm statistics of the global batch instead of each replica's,
        moving statistics of one replica only, an attack seeded alike on both replicas,
        metrics read from one replica (History is the mean over both shards), the
        regularizers' penalties not divided among the replicas (or divided twice)."""
        info = self.result["keras_fit_live_batch_norm"]
        self.assertEqual(info["iterations"], 3)
        self.assertGreater(info["reference_moved"], 1e-2)
        self.assertLess(info["weight_error"], 1e-5)
        self.assertLess(info["statistics_error"], 1e-5)
        for key, value in info["reference_logs"].items():
            self.assertAllClose(info["history"][key], value, rtol=1e-5, msg=key)
        # Keras' per-layer list of activity penalties is shared by the replicas' threads.
        self.assertIn("activity regularizer", info["activity_refusal"])
        self.assertNotIn("\n", info["activity_refusal"])

    def test_the_top_hessian_eigenvalue_does_not_depend_on_the_replicas(self):
        """Catches a Hessian-vector product of one replica's loss (not all-reduced), or
        of each replica's mean (the sum over replicas would double it)."""
        mirrored, single = (self.result["sharpness"][k] for k in ("mirrored", "single"))
        self.assertTrue(mirrored[2] and single[2])  # both converged
        self.assertAllClose(mirrored[0], single[0], rtol=1e-4)
        self.assertGreater(single[0], 0.0)

    def test_disadv_free_attack_equals_the_separate_attack_on_two_replicas(self):
        """--attack_source clean_pass against --attack_steps 1 --attack_init zero
        --attack_bn main (smoothing 0): weights, statistics and losses to 1e-6."""
        info = self.result["free_attack"]
        self.assertLess(info["max_variable_difference"], 1e-6)
        self.assertLess(info["max_loss_difference"], 1e-6)
        self.assertGreater(info["moved"], 1e-3)

    def test_loss_scaling_skips_on_every_replica_when_one_overflows(self):
        ours = self.result["overflow"]["ours"]
        self.assertTrue(ours["unchanged"])  # the step was skipped everywhere
        self.assertEqual(ours["iterations"], 1)  # and still counted
        self.assertEqual(ours["scale_ratio"], 0.5)  # the loss scale halved
        # Keras' own optimizer decides from replica 0 alone and applies the
        # overflow: the comparison above can fail.
        self.assertFalse(self.result["overflow"]["keras"]["finite"])


if __name__ == "__main__":
    tf.test.main()
