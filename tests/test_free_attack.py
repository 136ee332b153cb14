"""The free attack (--attack_source clean_pass) on one device: DisAdv's equivalence with
the separate attack, ConAdv against an eager reference, what its steps, prologue and a
refill differentiate, float16 (overflow included), resume and Keras."""

import dataclasses
import tempfile

import keras
import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import free_attack
from conadv import steps as steps_lib
from input_pipeline.base import TRAIN, PipelineOptions
from input_pipeline.digits import DigitsSource
from official import precision
from official.model_conversion import split_batch_norm
from official.split_batch_norm import call_model
from tests import method_testing as mt

BATCH = 8
EPS, STEP = 8.0, 12.0
LR, WD, MOMENTUM, SMOOTHING = 0.1, 5e-4, 0.9, 0.1

#: What --attack_source=clean_pass computes with the separate attack's machinery.
ONE_STEP_FROM_CLEAN = attack_lib.AttackConfig(eps=EPS, random_init=False, bn_branch="main")


def run_steps(ctx, method, images, labels, steps, strategy=None):
    iterator = mt.batch_iterator(images, labels, strategy)
    if method == steps_lib.CONADV:
        mt.fill_ring(ctx, iterator, strategy)
    run = mt.step_runner(ctx, method, strategy)
    for _ in range(steps):
        run(iterator)
    return ctx.sums.totals()


class DisAdvCleanPassTest(tf.test.TestCase):
    """DisAdv + clean_pass computes DisAdv with a 1-step attack from the clean image through
    the main branch, without the attack's pass: with --label_smoothing 0 the same x_adv
    (∇ₓ of the same loss), so the same weights, statistics and losses, to 1e-6."""

    def _train(self, source, update_pass, smoothing=0.0):
        images, labels = mt.fixed_batches(3, BATCH, seed=41)
        model = mt.small_model(seed=7, width=0.25)
        ctx = mt.make_context(
            model,
            learning_rate=LR,
            weight_decay=WD,
            batch_size=BATCH,
            label_smoothing=smoothing,
            attack=ONE_STEP_FROM_CLEAN,
            update_pass=update_pass,
            attack_source=source,
        )
        totals = run_steps(ctx, steps_lib.DISADV, images, labels, 3)
        return mt.snapshot(model), totals

    def test_equals_the_separate_attack(self):
        for update_pass in steps_lib.UPDATE_PASSES:
            free, free_sums = self._train(steps_lib.CLEAN_PASS, update_pass)
            separate, sums = self._train(steps_lib.SEPARATE_ATTACK, update_pass)
            for got, want in zip(free, separate):  # weights and both branches' statistics
                self.assertAllClose(got, want, rtol=1e-6, atol=1e-6, msg=update_pass)
            for key in ("clean_loss", "adv_loss", "adv_linf", "clean_correct"):
                self.assertAllClose(free_sums[key], sums[key], rtol=1e-6, msg=key)
            self.assertGreater(free_sums["adv_linf"] / free_sums["adv_examples"], EPS - 1e-3)

    def test_differs_from_vanilla(self):
        """The adversarial half is trained on: the comparison above can fail."""
        free, _ = self._train(steps_lib.CLEAN_PASS, steps_lib.CONCATENATED)
        images, labels = mt.fixed_batches(3, BATCH, seed=41)
        model = mt.small_model(seed=7, width=0.25)
        ctx = mt.make_context(model, learning_rate=LR, weight_decay=WD, batch_size=BATCH)
        run_steps(ctx, steps_lib.VANILLA, images, labels, 3)
        self.assertGreater(max(np.abs(a - b).max() for a, b in zip(free, mt.snapshot(model))), 1e-3)


# --------------------------------------------------------------------------
# An independent eager reference of ConAdv with the free attack, written from the
# description (conadv/free_attack.py's docstring), not from its code.


def cropped_model(seed: int):
    """A small split-BatchNorm network that never sees the 2-pixel border of its input: those
    pixels' input gradient is exactly 0, so the free attack must leave them."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Cropping2D(2)(x)
    for filters in (8, 8):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(mt.NUM_CLASSES)(x)
    return split_batch_norm(keras.Model(inputs, outputs))


def smoothed_ce(labels, logits):
    targets = tf.one_hot(labels, mt.NUM_CLASSES) * (1.0 - SMOOTHING) + SMOOTHING / mt.NUM_CLASSES
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=-1)


def reference_free_attack(x, gradient):
    """x + α·sign(g) in the ε-ball and [0, 255] (α = 12 > ε = 8: the ball clips)."""
    step = x + STEP * np.sign(gradient)
    return np.clip(step, np.maximum(x - EPS, 0.0), np.minimum(x + EPS, 255.0)).astype(np.float32)


def reference_prologue_attack(model, x, y):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(smoothed_ce(y, call_model(model, x, True, "main", update_stats=False)))
    return reference_free_attack(x.numpy(), tape.gradient(loss, x).numpy())


def reference_conadv(model, images, labels, staleness, steps):
    """Step t trains batch t+τ clean (main) and the adversarial images of batch t, made
    from batch t's input gradient at θ_{t−τ} (the prologue's with θ_0), labelled by batch
    t; its own input gradient makes batch t+τ's. Momentum SGD, decay on rank > 1."""
    velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    adversarial = {
        k: reference_prologue_attack(model, images[k], labels[k]) for k in range(staleness)
    }
    for t in range(steps):
        clean = tf.constant(images[t + staleness])
        with tf.GradientTape() as tape:
            tape.watch(clean)
            clean_logits = call_model(model, clean, True, "main")
            adv_logits = call_model(model, tf.constant(adversarial[t]), True, "aux")
            loss = (
                0.5
                * (
                    tf.reduce_sum(smoothed_ce(labels[t + staleness], clean_logits))
                    + tf.reduce_sum(smoothed_ce(labels[t], adv_logits))
                )
                / BATCH
            )
        *grads, input_gradient = tape.gradient(loss, [*model.trainable_variables, clean])
        adversarial[t + staleness] = reference_free_attack(
            images[t + staleness], input_gradient.numpy()
        )
        for i, (var, g) in enumerate(zip(model.trainable_variables, grads)):
            w = var.numpy()
            g = np.zeros(w.shape, np.float32) if g is None else g.numpy()
            decay = WD * w if w.ndim > 1 else 0.0
            velocity[i] = MOMENTUM * velocity[i] + LR * (g + decay)
            var.assign(w - velocity[i])
    return adversarial


class ConAdvCleanPassTest(tf.test.TestCase):
    STEPS = 4
    TOLERANCE = 1e-5

    def _check(self, staleness):
        images, labels = mt.fixed_batches(self.STEPS + staleness, BATCH, seed=50 + staleness)
        model = cropped_model(seed=8)
        initial = mt.snapshot(model)
        ctx = mt.make_context(
            model,
            learning_rate=LR,
            weight_decay=WD,
            staleness=staleness,
            batch_size=BATCH,
            label_smoothing=SMOOTHING,
            attack=dataclasses.replace(ONE_STEP_FROM_CLEAN, step_size=STEP),
            attack_source=steps_lib.CLEAN_PASS,
        )
        run_steps(ctx, steps_lib.CONADV, images, labels, self.STEPS)
        got = mt.snapshot(model)
        mt.restore(model, initial)
        adversarial = reference_conadv(model, images, labels, staleness, self.STEPS)
        want = mt.snapshot(model)
        error = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6)) for a, b in zip(got, want)
        )
        self.assertLess(error, self.TOLERANCE)
        self.assertGreater(mt.update_error(initial, initial, want), 0.5)  # the weights moved
        # The ring holds the last τ batches' adversarial images, labelled by their batch.
        for k in range(self.STEPS, self.STEPS + staleness):
            slot = k % staleness
            ring_adv = ctx.ring.local_slots("adversarial")[0][slot].numpy()
            self.assertAllEqual(ctx.ring.local_slots("labels")[0][slot].numpy(), labels[k])
            self.assertAllClose(ring_adv, adversarial[k], atol=1e-4)
            border = np.ones(ring_adv.shape[1:3], bool)
            border[2:-2, 2:-2] = False
            self.assertAllEqual(ring_adv[:, border], images[k][:, border])  # gradient 0
            moved = np.abs(ring_adv - images[k])[:, ~border]
            self.assertLessEqual(moved.max(), EPS + 1e-4)
            self.assertGreater(np.mean(np.abs(moved - EPS) < 1e-4), 0.5)

    def test_staleness_one(self):
        self._check(1)

    def test_staleness_two(self):
        self._check(2)


class Float16InputGradientTest(tf.test.TestCase):
    """Under float16 the input gradient comes from the scaled loss, then is unscaled.

    At a large global batch the clean pass's loss (divided by the batch) has pixel
    gradients below float16's smallest number: from the unscaled loss they flush to 0.
    """

    def test_scaled_then_unscaled(self):
        images, labels = mt.fixed_batches(1, BATCH, seed=60)
        model16 = mt.small_model(seed=9, width=0.25, dtype_policy=precision.MIXED_FLOAT16)
        model32 = mt.small_model(seed=9, width=0.25)
        mt.restore(model32, mt.snapshot(model16))
        ctx = mt.make_context(
            model16,
            batch_size=BATCH,
            attack=ONE_STEP_FROM_CLEAN,
            dtype_policy=precision.MIXED_FLOAT16,
            attack_source=steps_lib.CLEAN_PASS,
            staleness=1,
        )
        ctx = dataclasses.replace(ctx, global_batch_size=32768)
        x = tf.constant(images[0])

        @tf.function
        def free_gradient():
            return free_attack.clean_pass(ctx, x, tf.constant(labels[0]))[1]

        def unscaled_float16_gradient():
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = call_model(model16, x, True, "main", update_stats=False)
                loss = 0.5 * tf.reduce_sum(smoothed_ce(labels[0], logits)) / 32768
            return tape.gradient(loss, x).numpy()

        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = call_model(model32, x, True, "main", update_stats=False)
            loss = 0.5 * tf.reduce_sum(smoothed_ce(labels[0], tf.cast(logits, tf.float32))) / 32768
        want = tape.gradient(loss, x).numpy()
        got = free_gradient().numpy()
        clear = np.abs(want) > 1e-2 * np.abs(want).max()
        self.assertGreater(np.mean(np.sign(got[clear]) == np.sign(want[clear])), 0.95)
        ratio = np.median(np.abs(got[clear]) / np.abs(want[clear]))
        self.assertBetween(ratio, 0.5, 2.0)  # unscaled: the gradient's own size
        # Without the scale most of the gradient is lost (the test can tell).
        self.assertGreater(np.mean(unscaled_float16_gradient() == 0.0), 0.5)
        # ConAdv's prologue takes its input gradient the same way: the ring's first
        # examples move by the sign of the float32 gradient where that gradient is clear.
        tf.function(free_attack.build_prologue(ctx))((x, tf.constant(labels[0])), 0)
        moved = tf.cast(ctx.ring.read(0)[2], tf.float32).numpy() - images[0]
        self.assertGreater(np.mean(np.sign(moved[clear]) == np.sign(want[clear])), 0.95)


# --------------------------------------------------------------------------
# What the free attack differentiates: the clean pass's cross-entropy, through the main
# branch, in its steps and its prologue alike.


def regularized_model(seed: int):
    """A small split-BatchNorm network whose convolutions' features carry an L2 activity
    regularizer: its penalty (in ``model.losses``) depends on the input images."""
    keras.utils.set_random_seed(seed)
    penalty = keras.regularizers.L2(0.01)
    inputs = keras.Input((mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    for filters in (8, 8):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU(activity_regularizer=penalty)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(mt.NUM_CLASSES)(x)
    return split_batch_norm(keras.Model(inputs, outputs))


def input_gradient_signs(model, x, y, with_model_losses: bool):
    """sign ∇ₓ of ΣCE (no smoothing) through the main branch, plus Σ model.losses if asked."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = call_model(model, x, True, "main", update_stats=False)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        if with_model_losses:
            loss += tf.add_n(model.losses)
    return np.sign(tape.gradient(loss, x).numpy())


class RegularizedDisAdvTest(tf.test.TestCase):
    """With an activity regularizer DisAdv + clean_pass still computes DisAdv with the
    separate attack's matching settings (1 step from the clean image through the main
    branch, smoothing 0): the weights and statistics after 3 steps agree to 1e-6.

    Catches: the model's regularizers (``model.losses``) in the free attack's input
    gradient, which the separate attack does not differentiate (measured |Δw| 6.5e-3
    after 3 steps)."""

    def _train(self, source):
        images, labels = mt.fixed_batches(3, BATCH, seed=43)
        model = regularized_model(seed=11)
        ctx = mt.make_context(
            model,
            learning_rate=LR,
            weight_decay=WD,
            batch_size=BATCH,
            attack=ONE_STEP_FROM_CLEAN,
            attack_source=source,
        )
        run_steps(ctx, steps_lib.DISADV, images, labels, 3)
        return mt.snapshot(model)

    def test_equals_the_separate_attack(self):
        free = self._train(steps_lib.CLEAN_PASS)
        separate = self._train(steps_lib.SEPARATE_ATTACK)
        for got, want in zip(free, separate):
            self.assertAllClose(got, want, rtol=1e-6, atol=1e-6)
        # The regularizer turns the sign of part of the input gradient (the test can tell).
        images, labels = mt.fixed_batches(1, BATCH, seed=43)
        model = regularized_model(seed=11)
        plain = input_gradient_signs(model, images[0], labels[0], with_model_losses=False)
        regularized = input_gradient_signs(model, images[0], labels[0], with_model_losses=True)
        self.assertGreater(np.mean(plain != regularized), 0.05)


class PrologueTest(tf.test.TestCase):
    """ConAdv's prologue makes of a batch the adversarial images the steps' clean pass
    makes of it with the same weights: filled from batch A with θ_0, the ring's slot is
    then read by a step whose clean batch is A again, which writes its own x_adv(θ_0) of
    A there; the two are equal (a model with an activity regularizer, smoothing 0.1).

    Catches: a prologue differentiating another loss than the steps (the regularizers
    in one and not the other, another smoothing) or through another branch."""

    def test_prologue_images_are_the_first_steps(self):
        images, labels = mt.fixed_batches(1, BATCH, seed=45)
        model = regularized_model(seed=12)
        ctx = mt.make_context(
            model,
            learning_rate=LR,
            staleness=1,
            batch_size=BATCH,
            label_smoothing=SMOOTHING,
            attack=dataclasses.replace(ONE_STEP_FROM_CLEAN, step_size=STEP),
            update_pass=steps_lib.SEPARATE,  # the clean pass on B rows, as the prologue's
            attack_source=steps_lib.CLEAN_PASS,
        )
        mt.fill_ring(ctx, mt.batch_iterator(images, labels))
        prologue = ctx.ring.local_slots("adversarial")[0][0].numpy()
        mt.step_runner(ctx, steps_lib.CONADV)(mt.batch_iterator(images, labels))
        step = ctx.ring.local_slots("adversarial")[0][0].numpy()
        self.assertAllEqual(prologue, step)
        moved = np.abs(step - images[0])
        self.assertGreater(np.mean(np.abs(moved - EPS) < 1e-4), 0.9)  # at the ball's edge


class RefillTest(tf.test.TestCase):
    """A ConAdv + clean_pass ring refilled after training (as the trainer refills a ring
    its checkpoint could not restore) holds, in every slot, the batch's x + α·sign ∇ₓ of
    the smoothed cross-entropy through the main branch at the trained weights, computed
    eagerly; through the auxiliary branch, which training has moved away from the main
    one, the images differ.

    Catches: the free attack's prologue differentiating through the auxiliary branch."""

    def test_refilled_ring_is_the_main_branch_attack(self):
        trainer = mt.small_trainer(
            tempfile.mkdtemp(dir=self.get_temp_dir()),
            method="conadv",
            staleness=2,
            train_steps=4,
            steps_per_loop=4,
            learning_rate=0.5,
            lr_schedule="step",  # boundaries in epochs: 0.5 throughout
            label_smoothing=SMOOTHING,
            attack=dataclasses.replace(ONE_STEP_FROM_CLEAN, step_size=STEP),
            attack_source=steps_lib.CLEAN_PASS,
        )
        trainer.train(evaluate=False)
        trainer.ring.reset()
        trainer.open_training_stream(trainer.global_step)
        trainer.fill_ring_buffer()
        # Synthetic data: every training batch is the same one.
        x, y = (t.numpy() for t in next(iter(trainer.source.dataset(TRAIN, BATCH))))

        def reference(branch):
            images = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(images)
                logits = call_model(trainer.model, images, True, branch, update_stats=False)
                loss = tf.reduce_sum(smoothed_ce(y, logits))
            return reference_free_attack(x, tape.gradient(loss, images).numpy())

        main, aux = reference("main"), reference("aux")
        self.assertGreater(np.mean(main != aux), 0.02)  # the branches differ
        for slot in range(trainer.ring.staleness):
            ring = trainer.ring.local_slots("adversarial")[0][slot].numpy()
            self.assertAllEqual(trainer.ring.local_slots("labels")[0][slot].numpy(), y)
            self.assertAllClose(ring, main, atol=1e-4, msg=f"slot {slot}")


def amplifying_model(rows, gain: float):
    """A float16 linear classifier of the raw pixels whose weights on the flattened pixels
    ``rows`` are ``gain`` times the rest: their input gradients are ``gain`` times larger,
    so a loss scale can make them overflow in float16 while the logits' gradients and every
    other pixel's stay finite."""
    keras.utils.set_random_seed(13)
    inputs = keras.Input((mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3))
    x = keras.layers.Flatten(dtype=precision.MIXED_FLOAT16)(inputs)
    dense = keras.layers.Dense(mt.NUM_CLASSES, dtype=precision.MIXED_FLOAT16)
    model = keras.Model(inputs, dense(x))
    kernel = dense.kernel.numpy()
    kernel[rows] *= gain
    dense.kernel.assign(kernel)
    return model


class Float16OverflowTest(tf.test.TestCase):
    """Under float16 the scaled loss's input gradient can overflow: a pixel whose gradient
    is not finite has no usable sign and stays unperturbed, in the prologue's images and
    in a step's, while every other pixel moves by the sign of its gradient. The reference
    is an eager float16 tape of the scaled loss.

    Catches: float16 input gradients whose overflowed pixels are not zeroed (their sign
    taken, or NaN images)."""

    SCALE = 2.0**19

    def test_overflowed_pixels_stay(self):
        images, labels = mt.fixed_batches(1, BATCH, seed=62)
        x = np.round(images[0] / 4.0) + 60.0  # small integers: float16 represents x ± ε
        y = labels[0]
        rows = np.zeros((mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3), bool)
        rows[5, 4:8, :] = True
        model = amplifying_model(rows.reshape(-1), gain=40.0)
        ctx = mt.make_context(
            model,
            batch_size=BATCH,
            attack=dataclasses.replace(ONE_STEP_FROM_CLEAN, step_size=STEP),
            dtype_policy=precision.MIXED_FLOAT16,
            update_pass=steps_lib.SEPARATE,
            attack_source=steps_lib.CLEAN_PASS,
            staleness=1,
        )
        ctx.optimizer.dynamic_scale.assign(self.SCALE)

        images16 = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(images16)
            logits = tf.cast(call_model(model, images16, True, "main"), tf.float32)
            targets = tf.one_hot(y, mt.NUM_CLASSES)
            per_example = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
            scaled = 0.5 * tf.reduce_sum(per_example) / BATCH * self.SCALE
        gradient = tape.gradient(scaled, images16).numpy()
        overflowed = ~np.isfinite(gradient)
        self.assertGreater(overflowed.mean(), 0.0)
        self.assertLess(overflowed.mean(), 0.05)
        self.assertTrue(np.all(rows[None] | ~overflowed))  # only the amplified pixels
        want = np.where(overflowed, x, reference_free_attack(x, np.nan_to_num(gradient)))

        mt.fill_ring(ctx, mt.batch_iterator(x[None], y[None]))
        prologue = tf.cast(ctx.ring.local_slots("adversarial")[0][0], tf.float32).numpy()
        # A ConAdv step on the same batch writes its own images of it where it read.
        mt.step_runner(ctx, steps_lib.CONADV)(mt.batch_iterator(x[None], y[None]))
        step = tf.cast(ctx.ring.local_slots("adversarial")[0][0], tf.float32).numpy()
        for name, got in (("prologue", prologue), ("step", step)):
            self.assertAllEqual(got[overflowed], x[overflowed], msg=name)
            self.assertAllEqual(got, want, msg=name)
            self.assertGreater(np.mean(np.abs(got - x)[~overflowed] == EPS), 0.9, msg=name)


class ResumeTest(tf.test.TestCase):
    """A ConAdv + clean_pass run stopped after a checkpoint and restarted in a new trainer
    (as after SIGKILL) ends with the uninterrupted run's weights: the ring's labels and
    adversarial images are restored and the stream continues after them."""

    def _trainer(self, model_dir, steps):
        return mt.small_trainer(
            model_dir,
            train_steps=steps,
            staleness=2,
            attack=dataclasses.replace(ONE_STEP_FROM_CLEAN, step_size=STEP),
            attack_source=steps_lib.CLEAN_PASS,
            lr_schedule="step",  # boundaries in epochs: the same rates whatever the length
            checkpoint_steps=1,
        )

    def test_resume_matches_uninterrupted(self):
        whole = self._trainer(tempfile.mkdtemp(dir=self.get_temp_dir()), 5)
        initial = mt.snapshot(whole.model)
        whole.train(evaluate=False)
        want = mt.snapshot(whole.model)
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        self._trainer(model_dir, 2).train(evaluate=False)
        resumed = self._trainer(model_dir, 5)
        resumed.train(evaluate=False)
        self.assertEqual(resumed.global_step, 5)
        for got, expected in zip(mt.snapshot(resumed.model), want):
            self.assertAllClose(got, expected, rtol=1e-6, atol=1e-6)
        self.assertGreater(mt.update_error(initial, initial, want), 0.5)


class KerasCleanPassTest(tf.test.TestCase):
    """``ConAdvModel(attack_source="clean_pass")``: DisAdv equals DisAdv with the separate
    attack's matching settings (smoothing 0); other attack settings are refused."""

    def _fit(self, source):
        from conadv.keras import ConAdvModel

        images, labels = mt.fixed_batches(1, 24, seed=70)
        keras.utils.set_random_seed(3)
        inner = keras.Sequential(
            [
                keras.Input((mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3)),
                keras.layers.Rescaling(1.0 / 255.0),
                keras.layers.Conv2D(4, 3, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(mt.NUM_CLASSES),
            ]
        )
        settings = {} if source == steps_lib.CLEAN_PASS else {"attack_random_init": False}
        model = ConAdvModel(
            inner,
            method="disadv",
            attack_eps=EPS,
            label_smoothing=0.0,
            attack_source=source,
            **settings,
        )
        if source == steps_lib.SEPARATE_ATTACK:  # the main branch, as the free attack's
            model.attack_config = dataclasses.replace(model.attack_config, bn_branch="main")
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        model.fit(images[0], labels[0], batch_size=8, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in model.network.variables]

    def test_disadv_equals_separate(self):
        free, separate = self._fit(steps_lib.CLEAN_PASS), self._fit(steps_lib.SEPARATE_ATTACK)
        for got, want in zip(free, separate):
            self.assertAllClose(got, want, rtol=1e-6, atol=1e-6)

    def test_refuses_other_attacks(self):
        from conadv.keras import ConAdvModel

        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        for settings in ({"attack_steps": 2}, {"attack_random_init": True}):
            with self.assertRaisesRegex(ValueError, "1-step attack from the clean image"):
                ConAdvModel(inner, attack_source="clean_pass", **settings)

    def test_a_step_refuses_an_attack_the_clean_pass_cannot_give(self):
        """Catches: a step context built by hand (not through the flags or ConAdvModel)
        with the free attack and a random start or the auxiliary branch, trained
        silently as if it were the attack it describes."""
        model = mt.small_model(seed=9, width=0.25)
        for attack in (
            dataclasses.replace(ONE_STEP_FROM_CLEAN, random_init=True),
            dataclasses.replace(ONE_STEP_FROM_CLEAN, bn_branch="aux"),
            dataclasses.replace(ONE_STEP_FROM_CLEAN, num_steps=2),
        ):
            ctx = mt.make_context(model, attack=attack, attack_source=steps_lib.CLEAN_PASS)
            with self.assertRaisesRegex(ValueError, "from_clean_pass") as caught:
                steps_lib.build_step(steps_lib.DISADV, ctx)
            self.assertNotIn("\n", str(caught.exception))
        ctx = mt.make_context(model, attack=ONE_STEP_FROM_CLEAN, attack_source=steps_lib.CLEAN_PASS)
        steps_lib.build_step(steps_lib.DISADV, ctx)  # the free attack itself is accepted


class TrainerPathsTest(tf.test.TestCase):
    """ConAdv with the free attack through the trainer: XLA computes what the default path
    does (a TPU-compatibility check), and accumulation with bfloat16 trains with the
    ring's τ·N micro-batch slots holding each micro-batch's adversarial images."""

    def _trainer(self, **overrides):
        settings = dict(
            method="conadv",
            attack=ONE_STEP_FROM_CLEAN,
            attack_source=steps_lib.CLEAN_PASS,
            optimizer="lars",
            weight_decay=5e-4,
            learning_rate=2.0,
        )
        settings.update(overrides)
        return mt.small_trainer(tempfile.mkdtemp(dir=self.get_temp_dir()), **settings)

    def test_xla_matches_the_default_path(self):
        results = {}
        for jit in (False, True):
            trainer = self._trainer(jit_compile=jit)
            initial = mt.snapshot(trainer.model)
            trainer.train(evaluate=False)
            results[jit] = mt.snapshot(trainer.model)
        error = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))
            for a, b in zip(results[True], results[False])
        )
        self.assertLess(error, 1e-4)
        self.assertGreater(mt.update_error(initial, initial, results[False]), 0.5)

    def test_accumulation_with_bfloat16(self):
        # Digits: every micro-batch of the stream differs (synthetic data repeats one).
        digits = DigitsSource(mt.IMAGE_SIZE, PipelineOptions(seed=5, deterministic=True))
        # 4 steps: every slot is written after the prologue (a ring of τ slots, not τ·N,
        # would leave two of them as the prologue wrote them).
        trainer = self._trainer(
            accumulation_steps=2,
            precision="mixed_bfloat16",
            staleness=2,
            source=digits,
            train_steps=4,
            steps_per_loop=4,
        )
        initial = mt.snapshot(trainer.model)
        trainer.train(evaluate=False)
        self.assertEqual(trainer.global_step, 4)
        self.assertEqual(trainer.ring.staleness, 4)  # τ·N micro-batch slots
        self.assertEqual(trainer.train_sums.totals()["examples"], 32)
        final = mt.snapshot(trainer.model)
        self.assertTrue(all(np.all(np.isfinite(v)) for v in final))
        self.assertGreater(mt.update_error(initial, initial, final), 0.5)
        adversarial = tf.cast(trainer.ring.local_slots("adversarial")[0], tf.float32).numpy()
        ring_labels = trainer.ring.local_slots("labels")[0].numpy()
        self.assertEqual(trainer.ring.local_slots("adversarial")[0].dtype, tf.bfloat16)
        self.assertEqual(trainer.ring.fields, ("labels", "adversarial"))
        # Each slot k holds the labels and a perturbation (within ε, in [0, 255], up to
        # bfloat16's rounding) of the stream's micro-batch j with j ≡ k (mod τ·N), each
        # slot a micro-batch of its own.
        stream = list(trainer.source.dataset(TRAIN, 4).take(4 * 4))
        slots = len(ring_labels)
        held = []
        for k in range(slots):
            matches = [
                j
                for j, (images, labels) in enumerate(stream)
                if np.array_equal(labels.numpy(), ring_labels[k])
                and np.abs(adversarial[k] - images.numpy()).max() <= EPS + 1.0
            ]
            self.assertLen(matches, 1, f"slot {k}")
            self.assertEqual(matches[0] % slots, k)
            self.assertGreater(np.abs(adversarial[k] - stream[matches[0]][0].numpy()).max(), 0)
            held.append(matches[0])
        self.assertLen(set(held), slots)
        self.assertBetween(float(adversarial.min()), 0.0, 255.0)
