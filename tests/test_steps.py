"""The three training steps on one device: staleness, equivalences and split statistics."""

import numpy as np
import tensorflow as tf

from official import losses
from tests import method_testing as mt

BATCH = 8


def _bn_statistics(model, branch):
    stats = []
    for layer in model.split_batch_norm_layers():
        stats.append(getattr(layer, f"{branch}_moving_mean").numpy())
        stats.append(getattr(layer, f"{branch}_moving_variance").numpy())
    return stats


class StalenessTest(tf.test.TestCase):
    def _check(self, staleness):
        images, labels = mt.fixed_batches(8, BATCH, seed=staleness)
        model = mt.small_model()
        ctx = mt.make_context(model, learning_rate=0.2, staleness=staleness, batch_size=BATCH)
        iterator = mt.batch_iterator(images, labels)
        mt.fill_ring(ctx, iterator)
        run = mt.step_runner(ctx, "conadv")
        # Step t attacks batch t+τ with θ_t; batch t+τ is trained on at step t+τ.
        t = 2
        for _ in range(t):
            run(iterator)
        theta_t = mt.snapshot(model)
        for _ in range(staleness):  # steps t … t+τ−1
            run(iterator)
        # Now at step t+τ: the slot it reads holds batch t+τ.
        slot = (t + staleness) % staleness
        ring_images = ctx.ring.images[0][slot].numpy()
        ring_labels = ctx.ring.labels[0][slot].numpy()
        ring_adv = ctx.ring.adversarial[0][slot].numpy()
        self.assertAllEqual(ring_images, images[t + staleness])
        self.assertAllEqual(ring_labels, labels[t + staleness])

        theta_now = mt.snapshot(model)
        mt.restore(model, theta_t)
        expected = mt.attack_in_replica(
            ctx, images[t + staleness], labels[t + staleness], t + staleness
        )
        mt.restore(model, theta_now)
        fresh = mt.attack_in_replica(
            ctx, images[t + staleness], labels[t + staleness], t + staleness
        )
        self.assertAllClose(ring_adv, expected, atol=1e-3)
        # The weights moved, so the current weights give a different attack: the
        # comparison above can tell θ_t from θ_{t+τ}.
        self.assertGreater(np.mean(np.abs(fresh - expected) > 1.0), 0.01)

    def test_staleness_one_uses_previous_weights(self):
        self._check(1)

    def test_staleness_two_uses_weights_from_two_steps_back(self):
        self._check(2)


class ConAdvEqualsDisAdvAtZeroLearningRateTest(tf.test.TestCase):
    def test_identical_weights_statistics_and_adversarial_batches(self):
        images, labels = mt.fixed_batches(6, BATCH, seed=11)
        steps = 4
        results = {}
        for method in ("disadv", "conadv"):
            model = mt.small_model(seed=4)
            ctx = mt.make_context(
                model,
                learning_rate=0.0,
                optimizer="lars",
                staleness=1 if method == "conadv" else None,
                batch_size=BATCH,
                label_smoothing=0.1,
            )
            iterator = mt.batch_iterator(images, labels)
            if method == "conadv":
                mt.fill_ring(ctx, iterator)
            run = mt.step_runner(ctx, method)
            per_step, adversarial = [], []
            for _ in range(steps):
                if method == "conadv":
                    adversarial.append(ctx.ring.adversarial[0][0].numpy())
                ctx.sums.reset()
                run(iterator)
                per_step.append(ctx.sums.totals())
            if method == "disadv":
                # DisAdv's attack of batch t, recomputed (its weights never change).
                adversarial = [
                    mt.attack_in_replica(ctx, images[t], labels[t], t) for t in range(steps)
                ]
            results[method] = (mt.snapshot(model), per_step, adversarial)

        dis_vars, dis_sums, dis_adv = results["disadv"]
        con_vars, con_sums, con_adv = results["conadv"]
        for a, b in zip(dis_adv, con_adv):
            self.assertAllClose(a, b, atol=1e-4)
        for a, b in zip(dis_sums, con_sums):
            for key in ("adv_loss", "adv_linf", "clean_loss", "adv_examples"):
                self.assertAllClose(a[key], b[key], rtol=1e-5, msg=key)
        # Weights and both branches' moving statistics, which saw the same batches.
        for a, b in zip(dis_vars, con_vars):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)


class SplitStatisticsTest(tf.test.TestCase):
    def test_main_moves_toward_clean_and_aux_toward_adversarial(self):
        images, labels = mt.fixed_batches(3, BATCH, seed=5)
        model = mt.small_model()
        ctx = mt.make_context(model, learning_rate=0.0, staleness=1, batch_size=BATCH)
        iterator = mt.batch_iterator(images, labels)
        mt.fill_ring(ctx, iterator)
        clean = ctx.ring.images[0][0].numpy()
        adv = ctx.ring.adversarial[0][0].numpy()
        before = mt.snapshot(model)
        mt.step_runner(ctx, "conadv")(iterator)
        main_after, aux_after = _bn_statistics(model, "main"), _bn_statistics(model, "aux")

        def reference(x, branch):
            mt.restore(model, before)
            model(tf.constant(x), training=True, bn_branch=branch, update_stats=True)
            return _bn_statistics(model, branch)

        for got, want in zip(main_after, reference(clean, "main")):
            self.assertAllClose(got, want, rtol=1e-4, atol=1e-5)
        for got, want in zip(aux_after, reference(adv, "aux")):
            self.assertAllClose(got, want, rtol=1e-4, atol=1e-5)
        # And not toward the other batch: the two references differ.
        wrong = reference(adv, "main")
        diff = max(np.abs(a - b).max() for a, b in zip(main_after, wrong))
        self.assertGreater(diff, 1e-3)

    def test_vanilla_never_touches_auxiliary_statistics(self):
        images, labels = mt.fixed_batches(2, BATCH)
        model = mt.small_model()
        aux = _bn_statistics(model, "aux")
        ctx = mt.make_context(model, batch_size=BATCH)
        run = mt.step_runner(ctx, "vanilla")
        iterator = mt.batch_iterator(images, labels)
        run(iterator)
        run(iterator)
        for a, b in zip(aux, _bn_statistics(model, "aux")):
            self.assertAllEqual(a, b)


class VanillaMomentumTest(tf.test.TestCase):
    def test_matches_hand_computed_momentum_sgd(self):
        lr, wd, momentum, smoothing = 0.05, 1e-3, 0.9, 0.1
        images, labels = mt.fixed_batches(2, BATCH, seed=9)
        model = mt.small_model(width=0.25)
        weights0 = [v.numpy() for v in model.trainable_variables]

        def reference_gradients(x, y):
            """Gradient of the mean smoothed CE, on a fresh forward pass."""
            with tf.GradientTape() as tape:
                logits = model(tf.constant(x), training=True, bn_branch="main", update_stats=False)
                loss = tf.reduce_mean(losses.cross_entropy(tf.constant(y), logits, smoothing))
            grads = tape.gradient(loss, model.trainable_variables)
            return [
                np.zeros(v.shape) if g is None else g.numpy()
                for g, v in zip(grads, model.trainable_variables)
            ]

        # Hand computation: v ← m·v + lr·(g + wd·w) for N-D, without wd for 1-D; w ← w − v.
        expected, velocity = [w.copy() for w in weights0], [np.zeros_like(w) for w in weights0]
        for step in range(2):
            for var, value in zip(model.trainable_variables, expected):
                var.assign(value)
            grads = reference_gradients(images[step], labels[step])
            for i, (w, g) in enumerate(zip(expected, grads)):
                decay = wd * w if w.ndim > 1 else 0.0
                velocity[i] = momentum * velocity[i] + lr * (g + decay)
                expected[i] = w - velocity[i]

        for var, value in zip(model.trainable_variables, weights0):
            var.assign(value)
        ctx = mt.make_context(
            model, learning_rate=lr, weight_decay=wd, batch_size=BATCH, label_smoothing=smoothing
        )
        run = mt.step_runner(ctx, "vanilla")
        iterator = mt.batch_iterator(images, labels)
        run(iterator)
        run(iterator)
        for var, want in zip(model.trainable_variables, expected):
            self.assertAllClose(var.numpy(), want, rtol=1e-4, atol=1e-6, msg=var.path)
        # The step really moved the weights (the comparison is not vacuous).
        moved = max(
            np.abs(v.numpy() - w).max() for v, w in zip(model.trainable_variables, weights0)
        )
        self.assertGreater(moved, 1e-3)


class XlaTest(tf.test.TestCase):
    def test_each_method_compiles_with_jit(self):
        images, labels = mt.fixed_batches(3, 4)
        for method in ("vanilla", "disadv", "conadv"):
            model = mt.small_model(width=0.25)
            ctx = mt.make_context(
                model,
                staleness=1 if method == "conadv" else None,
                batch_size=4,
                optimizer="lars",
                weight_decay=5e-4,
            )
            iterator = mt.batch_iterator(images, labels)
            if method == "conadv":
                mt.fill_ring(ctx, iterator)
            before = mt.snapshot(model)
            mt.step_runner(ctx, method, jit_compile=True)(iterator)
            self.assertEqual(int(ctx.optimizer.iterations.numpy()), 1)
            changed = any(np.any(a != v.numpy()) for a, v in zip(before, model.variables))
            self.assertTrue(changed, method)


if __name__ == "__main__":
    tf.test.main()
