"""A resumed run reads the batches the uninterrupted run would have read, from the
step it stopped at (folder source, deterministic, 2 replicas; tests/resume_program.py)."""

import tensorflow as tf

from input_pipeline import epochs
from tests.child_process import run_for_result

#: Relative, per variable: the same batches and the same programs, so only
#: float summation order could differ.
WEIGHT_TOLERANCE = 1e-5


class ResumeAtTheRightBatchTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.result = run_for_result("-m", "tests.resume_program", timeout=900)

    def test_resumed_run_reads_each_step_s_batches_in_order(self):
        r = self.result
        self.assertEqual(r["replicas"], 2)
        self.assertEqual((r["whole_steps"], r["first_steps"], r["resumed_steps"]), (7, 3, 7))
        # 24 images, batch 8: three steps per epoch, so the resume (at batch
        # 3 + τ = 4, i.e. 32 records in) starts inside epoch 1 and crosses
        # into epoch 2: both the epoch arithmetic and the skip are exercised.
        self.assertEqual(r["steps_per_epoch"], 3)
        replicas, staleness = 2, 1
        # Steps 3…6 of the resumed run read batches 4…7 (the ring restored
        # from the checkpoint already holds batch 3): per step, one
        # per-replica batch for each replica, in delivery order.
        needed = (7 - 3) * replicas
        start = (3 + staleness) * replicas
        whole, resumed = r["whole"], r["resumed"]
        self.assertGreaterEqual(len(whole), start + needed)
        self.assertGreaterEqual(len(resumed), needed)
        for i in range(needed):
            step, replica = divmod(start + i, replicas)
            self.assertEqual(
                resumed[i]["labels"], whole[start + i]["labels"], f"batch {step} replica {replica}"
            )
            self.assertAllClose(resumed[i]["pixels"], whole[start + i]["pixels"], rtol=1e-6)
        # The stopped run read the same batches as the whole run up to its stop.
        for i in range((3 + staleness) * replicas):
            self.assertEqual(r["first"][i]["labels"], whole[i]["labels"])
        # Control: a resume that restarted the stream would deliver these
        # batches instead, and fails the comparison above.
        restarted = [b["pixels"] for b in whole[:needed]]
        expected = [b["pixels"] for b in whole[start : start + needed]]
        self.assertNotAllClose(restarted, expected)

    def test_resumed_run_ends_with_the_uninterrupted_weights(self):
        self.assertLess(self.result["max_rel_weight_diff"], WEIGHT_TOLERANCE)
        # The resumed run did train after its restore (the check above is not
        # satisfied by two untouched models).
        moved = self.result["resumed_vs_first_part_max_rel_diff"]
        self.assertGreater(moved, 100 * WEIGHT_TOLERANCE)


class EpochStreamTest(tf.test.TestCase):
    """``input_pipeline.epochs`` on a stream of numbers (no model)."""

    def stream(self, start, per_epoch=5, seed=3):
        def epoch(e):
            ds = tf.data.Dataset.range(per_epoch)
            return epochs.permute_blocks(ds, 4, epochs.epoch_seed(seed, e))

        ds = epochs.epochs_from(epoch, lambda: per_epoch, start)
        return [(int(e), int(x[0])) for e, x in ds.take(15)]

    def test_starting_anywhere_continues_the_stream_from_zero(self):
        whole = self.stream(0)
        for start in (1, 4, 5, 7):
            self.assertEqual(self.stream(start), self.stream(0)[start:] + self.stream(15)[:start])
        # Each epoch is a permutation of the records, and not every epoch has
        # the same order (blocks of 4: one of 24 orders, then one of 1).
        orders = [[x for e, x in whole if e == epoch] for epoch in range(3)]
        for order in orders:
            self.assertCountEqual(order, range(5))
        self.assertGreater(len({tuple(order) for order in orders}), 1)

    def test_the_order_depends_on_the_seed(self):
        self.assertNotEqual(self.stream(0, seed=3), self.stream(0, seed=4))
        self.assertEqual(self.stream(0, seed=3), self.stream(0, seed=3))

    def test_records_per_step_counts_the_replicas_a_pipeline_feeds(self):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=8
        )
        self.assertEqual(epochs.records_per_step(16, context), 64)
        self.assertEqual(epochs.records_per_step(16, None), 16)


if __name__ == "__main__":
    tf.test.main()
