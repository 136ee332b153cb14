"""The three training steps on one device: staleness, equivalences and split statistics."""

import tempfile

import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from official import losses
from official.split_batch_norm import call_model, split_layers
from tests import method_testing as mt

BATCH = 8


def _bn_statistics(model, branch):
    stats = []
    for layer in split_layers(model):
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
        ring_images = ctx.ring.local_slots("images")[0][slot].numpy()
        ring_labels = ctx.ring.local_slots("labels")[0][slot].numpy()
        ring_adv = ctx.ring.local_slots("adversarial")[0][slot].numpy()
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
    """At learning rate 0, ConAdv (stale weights) and DisAdv (current weights) see
    the same θ, so they must train on the same adversarial batches.

    Both are checked against an attack written here, not against
    ``steps.run_attack``: a bug in the attack shared by both methods (no random
    start, a wrong seed, a descending step, the wrong BatchNorm branch) would
    otherwise make them agree and pass.
    """

    STEPS = 4
    EPS = 8.0  # mt.make_context's attack: one step of size ε

    def independent_attack(self, model, x, y, batch_index):
        """The attack of docs/design.md, eagerly: x0 = clip(x + U(−ε, ε), 0, 255), one signed
        step of the summed CE through the auxiliary branch's batch statistics,
        projected onto the ε-ball and [0, 255].

        The random start is drawn as the code documents it (seed [ctx.seed, batch
        index] on one replica, the first of a Philox split, float32 from the top 24
        bits of an int64 draw), with TensorFlow's generator and NumPy arithmetic.
        """
        key = tf.constant([3, batch_index], tf.int64)
        start_seed = tf.random.experimental.stateless_split(key, 2, alg="philox")[0]
        bits = tf.random.stateless_uniform(
            x.shape, start_seed, minval=None, maxval=None, dtype=tf.int64, alg="philox"
        ).numpy()
        fraction = ((bits >> 40) & 0xFFFFFF) / 2.0**24
        noise = (-self.EPS + 2 * self.EPS * fraction).astype(np.float32)  # exact in float32
        x0 = tf.constant(np.clip(x + noise, 0.0, 255.0))
        with tf.GradientTape() as tape:
            tape.watch(x0)
            logits = call_model(model, x0, True, "aux", update_stats=False)
            log_p = tf.nn.log_softmax(logits)
            loss = -tf.reduce_sum(tf.gather(log_p, y, axis=1, batch_dims=1))
        step = x0.numpy() + self.EPS * np.sign(tape.gradient(loss, x0).numpy())
        lower, upper = np.maximum(x - self.EPS, 0.0), np.minimum(x + self.EPS, 255.0)
        return np.clip(step, lower, upper)

    def test_identical_weights_statistics_and_adversarial_batches(self):
        images, labels = mt.fixed_batches(6, BATCH, seed=11)
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
            for _ in range(self.STEPS):
                if method == "conadv":
                    adversarial.append(ctx.ring.local_slots("adversarial")[0][0].numpy())
                ctx.sums.reset()
                run(iterator)
                per_step.append(ctx.sums.totals())
            results[method] = (mt.snapshot(model), per_step, adversarial)

        dis_vars, dis_sums, _ = results["disadv"]
        con_vars, con_sums, con_adv = results["conadv"]
        # θ never moves (learning rate 0), so the initial model attacks every batch.
        reference = mt.small_model(seed=4)
        for t in range(self.STEPS):
            want = self.independent_attack(reference, images[t], labels[t], t)
            # ConAdv's stored attack (made at step t − 1, or by the prologue).
            self.assertAllClose(con_adv[t], want, atol=1e-4, msg=f"batch {t}")  # measured 1.5e-5
            # DisAdv's attack is not stored: its summed adversarial CE and L∞ distance.
            logits = call_model(reference, want, True, "aux", update_stats=False)
            adv_loss = tf.reduce_sum(reference_cross_entropy(labels[t], logits, 0.1))
            linf = np.abs(want - images[t]).max(axis=(1, 2, 3)).sum()
            self.assertAllClose(dis_sums[t]["adv_loss"], float(adv_loss), rtol=1e-4)
            self.assertAllClose(dis_sums[t]["adv_linf"], linf, rtol=1e-5)
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
        clean = ctx.ring.local_slots("images")[0][0].numpy()
        adv = ctx.ring.local_slots("adversarial")[0][0].numpy()
        before = mt.snapshot(model)
        mt.step_runner(ctx, "conadv")(iterator)
        main_after, aux_after = _bn_statistics(model, "main"), _bn_statistics(model, "aux")

        def reference(x, branch):
            mt.restore(model, before)
            call_model(model, tf.constant(x), True, branch, update_stats=True)
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
                logits = call_model(model, tf.constant(x), True, "main", update_stats=False)
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


# --------------------------------------------------------------------------
# Independent eager references: written here from the paper's equations, not
# from conadv/steps.py. Only the attack's seed convention (seed = [ctx.seed,
# batch index] on one replica, split into start and target seeds) is shared,
# so that both draw the same random start.

EPS = 8.0
LR, WD, MOMENTUM, SMOOTHING = 0.1, 5e-4, 0.9, 0.1


def reference_cross_entropy(labels, logits, smoothing):
    """Per-example CE against (1 − s)·onehot + s/C, from log-softmax."""
    num_classes = logits.shape[-1]
    targets = tf.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=-1)


def reference_attack(model, x, y, batch_index, seed=3):
    """One step of L∞ PGD with random start in pixel units, through the aux branch."""
    x = tf.constant(x, tf.float32)
    key = tf.constant([seed, batch_index], tf.int64)
    start_seed = tf.random.experimental.stateless_split(key, 2, alg="philox")[0]
    x0 = tf.clip_by_value(x + attack_lib.stateless_uniform(x.shape, start_seed, -EPS, EPS), 0, 255)
    with tf.GradientTape() as tape:
        tape.watch(x0)
        logits = call_model(model, x0, True, "aux", update_stats=False)
        loss = tf.reduce_sum(reference_cross_entropy(tf.constant(y), logits, 0.0))
    g = tape.gradient(loss, x0)
    step = x0 + EPS * tf.sign(g)
    return tf.clip_by_value(step, tf.maximum(x - EPS, 0.0), tf.minimum(x + EPS, 255.0)).numpy()


def reference_adversarial_gradients(model, x, y, adv, half=0.5):
    """Gradients of ½·(ΣCE_s(clean, main) + ΣCE_s(adv, aux)) / B; updates both branches' stats."""
    with tf.GradientTape() as tape:
        clean = call_model(model, tf.constant(x), True, "main", update_stats=True)
        attacked = call_model(model, tf.constant(adv), True, "aux", update_stats=True)
        loss = (
            half
            * (
                tf.reduce_sum(reference_cross_entropy(y, clean, SMOOTHING))
                + tf.reduce_sum(reference_cross_entropy(y, attacked, SMOOTHING))
            )
            / len(y)
        )
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), [
        np.zeros(v.shape, np.float32) if g is None else g.numpy()
        for g, v in zip(grads, model.trainable_variables)
    ]


def reference_momentum_update(model, grads, velocity):
    """v ← m·v + lr·(g + wd·w) (no decay on rank ≤ 1); w ← w − v. Mutates ``velocity``."""
    for i, (var, g) in enumerate(zip(model.trainable_variables, grads)):
        w = var.numpy()
        decay = WD * w if w.ndim > 1 else 0.0
        velocity[i] = MOMENTUM * velocity[i] + LR * (g + decay)
        var.assign(w - velocity[i])


def momentum_context(model, staleness=None, **kwargs):
    return mt.make_context(
        model,
        learning_rate=LR,
        weight_decay=WD,
        staleness=staleness,
        batch_size=BATCH,
        label_smoothing=SMOOTHING,
        attack=attack_lib.AttackConfig(eps=EPS),
        **kwargs,
    )


def max_relative_difference(got, want):
    return max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6)) for a, b in zip(got, want))


class ConAdvTrajectoryTest(tf.test.TestCase):
    """Six ConAdv steps against an eager reference that keeps the history of weights.

    Tolerance: 2e-4 relative per variable after 6 steps (float32, compiled
    versus eager order of operations). A wrong staleness (θ_t instead of
    θ_{t−τ}), a slot off by one, or a changed loss moves the weights by far more.
    """

    STEPS = 6
    TOLERANCE = 2e-4

    def _reference(self, images, labels, staleness, initial):
        model = mt.small_model(seed=4, width=0.25)
        mt.restore(model, initial)
        velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
        adversarial = {}
        # Prologue: batches 0 … τ−1 attacked with θ_0.
        for k in range(staleness):
            adversarial[k] = reference_attack(model, images[k], labels[k], k)
        for t in range(self.STEPS):
            # Step t: attack batch t+τ with θ_t, train on batch t attacked with θ_{t−τ}.
            nxt = t + staleness
            adversarial[nxt] = reference_attack(model, images[nxt], labels[nxt], nxt)
            _, grads = reference_adversarial_gradients(model, images[t], labels[t], adversarial[t])
            reference_momentum_update(model, grads, velocity)
        return mt.snapshot(model), adversarial

    def _check(self, staleness, update_pass):
        images, labels = mt.fixed_batches(self.STEPS + staleness, BATCH, seed=20 + staleness)
        model = mt.small_model(seed=4, width=0.25)
        initial = mt.snapshot(model)
        ctx = momentum_context(model, staleness=staleness, update_pass=update_pass)
        iterator = mt.batch_iterator(images, labels)
        mt.fill_ring(ctx, iterator)
        run = mt.step_runner(ctx, "conadv")
        for _ in range(self.STEPS):
            run(iterator)
        want, adversarial = self._reference(images, labels, staleness, initial)
        got = mt.snapshot(model)
        self.assertLess(max_relative_difference(got, want), self.TOLERANCE)
        # The ring now holds batches STEPS … STEPS+τ−1 and their stale attacks.
        for k in range(self.STEPS, self.STEPS + staleness):
            slot = k % staleness
            self.assertAllEqual(ctx.ring.local_slots("images")[0][slot].numpy(), images[k])
            self.assertAllClose(
                ctx.ring.local_slots("adversarial")[0][slot].numpy(), adversarial[k], atol=1e-3
            )
        # The weights really moved, so the comparison can fail.
        self.assertGreater(max_relative_difference(got, initial), 100 * self.TOLERANCE)

    def test_staleness_one(self):
        self._check(1, steps_lib.CONCATENATED)

    def test_staleness_two(self):
        self._check(2, steps_lib.CONCATENATED)

    def test_staleness_one_separate_passes(self):
        self._check(1, steps_lib.SEPARATE)

    def test_reference_tells_staleness_apart(self):
        """Fresh attacks (τ = 0, DisAdv's) give other weights than τ = 1: the test can fail."""
        images, labels = mt.fixed_batches(self.STEPS + 1, BATCH, seed=21)
        model = mt.small_model(seed=4, width=0.25)
        initial = mt.snapshot(model)
        stale, _ = self._reference(images, labels, 1, initial)
        mt.restore(model, initial)
        velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
        for t in range(self.STEPS):
            adv = reference_attack(model, images[t], labels[t], t)
            _, grads = reference_adversarial_gradients(model, images[t], labels[t], adv)
            reference_momentum_update(model, grads, velocity)
        self.assertGreater(max_relative_difference(mt.snapshot(model), stale), 10 * self.TOLERANCE)


class DisAdvHandComputationTest(tf.test.TestCase):
    """One DisAdv step = attack with θ_0, then ½·(CE_s clean + CE_s adv), then momentum SGD."""

    def test_one_step(self):
        images, labels = mt.fixed_batches(1, BATCH, seed=31)
        model = mt.small_model(seed=6, width=0.25)
        initial = mt.snapshot(model)
        ctx = momentum_context(model)
        mt.step_runner(ctx, "disadv")(mt.batch_iterator(images, labels))
        got = mt.snapshot(model)

        def hand(half=0.5, smooth_adv=True):
            mt.restore(model, initial)
            adv = reference_attack(model, images[0], labels[0], 0)
            with tf.GradientTape() as tape:
                clean = call_model(model, tf.constant(images[0]), True, "main")
                attacked = call_model(model, tf.constant(adv), True, "aux")
                smoothing = SMOOTHING if smooth_adv else 0.0
                loss = (
                    half
                    * (
                        tf.reduce_sum(reference_cross_entropy(labels[0], clean, SMOOTHING))
                        + tf.reduce_sum(reference_cross_entropy(labels[0], attacked, smoothing))
                    )
                    / BATCH
                )
            grads = tape.gradient(loss, model.trainable_variables)
            grads = [
                np.zeros(v.shape) if g is None else g.numpy()
                for g, v in zip(grads, model.trainable_variables)
            ]
            velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
            reference_momentum_update(model, grads, velocity)
            return mt.snapshot(model)

        tolerance = 1e-5  # relative, one float32 step
        self.assertLess(max_relative_difference(got, hand()), tolerance)
        # A ½ changed to 1, or smoothing dropped from the adversarial term, is caught.
        self.assertGreater(max_relative_difference(got, hand(half=1.0)), 100 * tolerance)
        self.assertGreater(max_relative_difference(got, hand(smooth_adv=False)), 10 * tolerance)


def compiled_loss_and_gradients(ctx, images, labels, adversarial):
    """``steps.adversarial_loss`` and its weight gradients, in one tf.function."""

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            loss, *_ = steps_lib.adversarial_loss(
                ctx, tf.constant(images), tf.constant(labels), tf.constant(adversarial)
            )
        return loss, steps_lib.weight_gradients(ctx, tape, loss)

    return run()


class ConcatenatedUpdateTest(tf.test.TestCase):
    """One pass over [clean; adv] with mixed BatchNorm equals two passes of B rows."""

    def test_loss_gradients_and_statistics_match(self):
        images, labels = mt.fixed_batches(1, BATCH, seed=41)
        rng = np.random.default_rng(3)
        adv = np.clip(images[0] + rng.choice([-8.0, 8.0], images[0].shape), 0, 255)
        adv = adv.astype(np.float32)
        results = {}
        for update_pass in steps_lib.UPDATE_PASSES:
            model = mt.small_model(seed=8, width=0.5)
            # Non-trivial γ/β per branch, so a branch mix-up changes the result.
            for layer in split_layers(model):
                n = layer.main_gamma.shape[0]
                layer.aux_gamma.assign(np.linspace(0.5, 1.5, n))
                layer.aux_beta.assign(np.linspace(-0.2, 0.2, n))
            ctx = mt.make_context(
                model, batch_size=BATCH, label_smoothing=0.1, update_pass=update_pass
            )

            loss, grads = compiled_loss_and_gradients(ctx, images[0], labels[0], adv)
            stats = [
                getattr(layer, f"{b}_moving_{k}").numpy()
                for layer in split_layers(model)
                for b in ("main", "aux")
                for k in ("mean", "variance")
            ]
            results[update_pass] = (float(loss), [g.numpy() for g in grads], stats)
        (l1, g1, s1), (l2, g2, s2) = results.values()
        self.assertAllClose(l1, l2, rtol=1e-5, atol=1e-5)
        self.assertLen(g1, len(g2))
        for a, b in zip(g1, g2):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(s1, s2):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)
        # Both branches' γ received gradient (the mixed pass used both), and the
        # auxiliary statistics moved: the comparison covers both branches.
        self.assertGreater(max(np.abs(g).max() for g in g1), 0.0)
        self.assertGreater(np.abs(s1[2]).max(), 1e-3)  # first layer's aux moving mean


class XlaTest(tf.test.TestCase):
    """Each replica step compiled by XLA (as TPUStrategy compiles it) computes what the
    default path computes: the trainer's prologue, steps and evaluation, 3 steps of LARS.

    Tolerance: 1e-4 relative per variable (XLA fuses and reorders float32 work).
    """

    TOLERANCE = 1e-4

    def test_every_method_matches_the_default_path(self):
        for method in steps_lib.METHODS:
            results = {}
            for jit in (False, True):
                trainer = mt.small_trainer(
                    tempfile.mkdtemp(dir=self.get_temp_dir()),
                    method=method,
                    jit_compile=jit,
                    optimizer="lars",
                    weight_decay=5e-4,
                    learning_rate=2.0,
                )
                initial = mt.snapshot(trainer.model)
                trainer.train(evaluate=False)
                self.assertEqual(trainer.global_step, 3)
                results[jit] = (initial, mt.snapshot(trainer.model), trainer.evaluate())
            (init_a, plain, eval_plain), (init_b, compiled, eval_compiled) = (
                results[False],
                results[True],
            )
            self.assertEqual(max_relative_difference(init_a, init_b), 0.0)
            self.assertLess(max_relative_difference(compiled, plain), self.TOLERANCE, method)
            self.assertGreater(max_relative_difference(plain, init_a), 100 * self.TOLERANCE)
            for key in ("loss", "top1", "top5", "examples"):
                self.assertAllClose(eval_compiled[key], eval_plain[key], rtol=1e-4, msg=key)


class MixedBfloat16Test(tf.test.TestCase):
    """bfloat16 compute on CPU: float32 variables, a bfloat16 ring, ε kept in storage.

    Stored adversarial images are rounded to bfloat16 *inside* the ε-ball of
    the stored clean images (``precision.round_within``), so the bound holds
    exactly, with no rounding slack; plain rounding to nearest would overshoot
    by up to half a unit in the last place (0.5 at pixel values 128–255).
    """

    def test_all_methods_train(self):
        for method in steps_lib.METHODS:
            trainer = mt.small_trainer(
                tempfile.mkdtemp(dir=self.get_temp_dir()), method=method, precision="mixed_bfloat16"
            )
            initial = mt.snapshot(trainer.model)
            trainer.train(evaluate=False)
            totals = trainer.train_sums.totals()
            self.assertEqual(totals["examples"], 24, method)
            self.assertTrue(np.isfinite(totals["clean_loss"]), method)
            self.assertEqual(trainer.model.get_layer("stem_conv").compute_dtype, "bfloat16")
            for var in trainer.model.variables + trainer.optimizer.variables:
                dtype = tf.as_dtype(var.dtype)
                if dtype.is_floating:
                    self.assertEqual(dtype, tf.float32, var.path)
            final = mt.snapshot(trainer.model)
            self.assertTrue(all(np.all(np.isfinite(v)) for v in final), method)
            self.assertGreater(max_relative_difference(final, initial), 1e-3, method)
            if method == steps_lib.CONADV:
                self._check_ring(trainer)

    def _check_ring(self, trainer):
        clean = trainer.ring.local_slots("images")[0]
        adversarial = trainer.ring.local_slots("adversarial")[0]
        self.assertEqual(clean.dtype, tf.bfloat16)
        self.assertEqual(adversarial.dtype, tf.bfloat16)
        # What the benchmark reports is what the slots really take.
        held = sum(trainer.ring.local_slots(n)[0].numpy().nbytes for n in ("images", "labels"))
        held += adversarial.numpy().nbytes
        self.assertEqual(trainer.ring.bytes_per_replica, held)
        clean = tf.cast(clean, tf.float32).numpy()
        adversarial = tf.cast(adversarial, tf.float32).numpy()
        eps = trainer.config.attack.eps
        distance = np.abs(adversarial - clean)
        self.assertLessEqual(distance.max(), eps)
        self.assertGreaterEqual(adversarial.min(), 0.0)
        self.assertLessEqual(adversarial.max(), 255.0)
        # The attack did move the pixels (most to within a bfloat16 step of the boundary).
        self.assertGreater(np.mean(distance >= eps - 1.0), 0.5)

    def test_float16_with_loss_scaling_trains(self):
        trainer = mt.small_trainer(
            tempfile.mkdtemp(dir=self.get_temp_dir()), method="conadv", precision="mixed_float16"
        )
        initial = mt.snapshot(trainer.model)
        trainer.train(evaluate=False)
        self.assertEqual(trainer.global_step, 3)
        self.assertEqual(trainer.ring.local_slots("images")[0].dtype, tf.float16)
        final = mt.snapshot(trainer.model)
        self.assertTrue(all(np.all(np.isfinite(v)) for v in final))
        self.assertGreater(max_relative_difference(final, initial), 1e-3)


if __name__ == "__main__":
    tf.test.main()
