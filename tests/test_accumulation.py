"""Gradient accumulation (``--accumulation_steps``): N micro-batches, one optimizer step."""

import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from official.split_batch_norm import SplitBatchNormalization
from tests import method_testing as mt

BATCH = 16
#: Relative, per variable: the same sums of the same per-example gradients,
#: only added in another order.
TOLERANCE = 1e-5


def frozen_model(seed=1):
    """A small ResNet whose BatchNorms use their moving statistics (Keras' trainable=False)."""
    model = mt.small_model(seed=seed, width=0.5)
    for layer in model._flatten_layers():
        if isinstance(layer, SplitBatchNormalization):
            layer.trainable = False
    return model


def micro_batches(images, labels, n):
    """Each step's batch as n consecutive micro-batches of B/n: [steps·n, B/n, ...]."""
    steps, batch = labels.shape
    return (
        images.reshape(steps * n, batch // n, *images.shape[2:]),
        labels.reshape(steps * n, batch // n),
    )


def max_relative_difference(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)) for x, y in zip(a, b))


class AccumulationTest(tf.test.TestCase):
    def train(self, method, n, steps, model, images, labels, **context):
        ctx = mt.make_context(model, batch_size=BATCH, accumulation_steps=n, **context)
        if n > 1:
            images, labels = micro_batches(images, labels, n)
        iterator = mt.batch_iterator(images, labels)
        if method == "conadv":
            mt.fill_ring(ctx, iterator)
        run = mt.step_runner(ctx, method)
        for _ in range(steps):
            run(iterator)
        return ctx

    def test_four_micro_batches_update_like_one_batch_for_vanilla(self):
        images, labels = mt.fixed_batches(2, BATCH, seed=21)
        results = {}
        for n in (1, 4):
            model = frozen_model()
            ctx = self.train("vanilla", n, 2, model, images, labels, weight_decay=1e-4)
            self.assertEqual(int(ctx.optimizer.iterations.numpy()), 2)  # one step per N
            results[n] = mt.snapshot(model)
        start = mt.snapshot(frozen_model())
        self.assertLess(max_relative_difference(results[1], results[4]), TOLERANCE)
        # The updates are far larger than the tolerance (the check can fail):
        # e.g. a loss divided by the micro-batch instead of the global batch
        # would give 4x these steps.
        self.assertGreater(max_relative_difference(start, results[1]), 1000 * TOLERANCE)

    def test_batch_statistics_are_per_micro_batch(self):
        """Without frozen BatchNorm the micro-batches normalise with their own
        statistics, so the update differs from the one-batch update."""
        images, labels = mt.fixed_batches(1, BATCH, seed=21)
        results = {}
        for n in (1, 4):
            model = mt.small_model(seed=1, width=0.5)
            self.train("vanilla", n, 1, model, images, labels)
            results[n] = mt.snapshot(model)
        self.assertGreater(max_relative_difference(results[1], results[4]), 100 * TOLERANCE)

    def test_conadv_ring_holds_two_tau_micro_batches_and_trains_like_one_batch(self):
        """ConAdv, τ = 1, N = 2: the ring has 2τ slots of B/2 and, with frozen
        BatchNorm and a deterministic attack start (each example's attack then
        depends on that example alone), training equals ConAdv on whole
        batches: a slot off by one, or a staleness counted in micro-batches
        instead of steps, trains on other pixels or with other weights."""
        attack = attack_lib.AttackConfig(eps=8.0, random_init=False)
        images, labels = mt.fixed_batches(4, BATCH, seed=22)
        steps = 3
        whole_model = frozen_model(seed=2)
        self.train("conadv", 1, steps, whole_model, images, labels, staleness=1, attack=attack)
        micro_model = frozen_model(seed=2)
        ctx = self.train(
            "conadv", 2, steps, micro_model, images, labels, staleness=1, attack=attack
        )
        self.assertEqual(ctx.ring.staleness, 2)  # τ·N micro-batches per replica
        self.assertEqual(ctx.ring.per_replica_batch, BATCH // 2)
        start = mt.snapshot(frozen_model(seed=2))
        self.assertLess(
            max_relative_difference(mt.snapshot(whole_model), mt.snapshot(micro_model)),
            TOLERANCE,
        )
        self.assertGreater(
            max_relative_difference(start, mt.snapshot(micro_model)), 1000 * TOLERANCE
        )
        # After step t = 2 the ring holds batch 3 (t + τ), as its two halves in
        # slots 0 and 1, each within ε of the clean images.
        ring_images, ring_labels, ring_adversarial = (
            np.concatenate([ctx.ring.local_slots(name)[0].numpy()[slot] for slot in (0, 1)])
            for name in ("images", "labels", "adversarial")
        )
        self.assertAllEqual(ring_labels, labels[3])
        self.assertAllClose(ring_images, images[3])
        self.assertLessEqual(float(np.max(np.abs(ring_adversarial - ring_images))), 8.0 + 1e-3)
        self.assertGreater(float(np.max(np.abs(ring_adversarial - ring_images))), 1.0)


if __name__ == "__main__":
    tf.test.main()
