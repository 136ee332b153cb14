"""The L∞ PGD attack: bounds, effect on the loss, and that it changes no variable."""

import keras
import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from official import losses
from tests import method_testing as mt


def _attack(model, images, labels, **config):
    return attack_lib.pgd_attack(
        model,
        tf.constant(images),
        tf.constant(labels),
        attack_lib.AttackConfig(**config),
        seed=tf.constant([5, 7], tf.int64),
        num_classes=mt.NUM_CLASSES,
    ).numpy()


class PixelBlindModel(keras.Model):
    """Logits that do not depend on the pixels (input gradient exactly 0), so the
    attack's signed step is 0 and its result is its random start."""

    def call(self, x, training=False, bn_branch="main", update_stats=True, group_statistics=True):
        pixels = tf.reduce_sum(x, axis=[1, 2, 3])[:, None]
        return 0.0 * pixels + tf.range(mt.NUM_CLASSES, dtype=tf.float32)


class RandomStartTest(tf.test.TestCase):
    """The random start x0 = clip(x + U(−ε, ε), 0, 255), seen through a zero gradient.

    Catches an attack without its random start (every test of AttackTest passes
    without it), noise of the wrong range or shape, and noise that ignores the seed.
    """

    EPS = 6.0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = PixelBlindModel()
        rng = np.random.default_rng(3)
        cls.images = rng.uniform(20, 230, (32, mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3)).astype(np.float32)
        cls.images[:4, :4] = 255.0  # saturated pixels: the start is clipped to [0, 255]
        cls.images[4:8, :4] = 0.0
        cls.labels = rng.integers(0, mt.NUM_CLASSES, 32).astype(np.int32)

    def _start(self, seed, random_init=True):
        return attack_lib.pgd_attack(
            self.model,
            tf.constant(self.images),
            tf.constant(self.labels),
            attack_lib.AttackConfig(eps=self.EPS, random_init=random_init),
            seed=tf.constant(seed, tf.int64),
            num_classes=mt.NUM_CLASSES,
        ).numpy()

    def test_start_is_uniform_in_the_eps_ball(self):
        noise = self._start([5, 7]) - self.images
        inner = (self.images > self.EPS) & (self.images < 255 - self.EPS)
        u = noise[inner] / self.EPS  # ~U(−1, 1) where no clip applies
        self.assertGreater(u.size, 20000)
        self.assertLessEqual(np.abs(u).max(), 1.0)
        self.assertGreater(u.max(), 0.999)
        self.assertLess(u.min(), -0.999)
        self.assertLess(abs(u.mean()), 0.02)  # standard error ≈ 0.004
        self.assertAllClose(u.std(), 1 / np.sqrt(3), rtol=0.02)
        counts, _ = np.histogram(u, bins=10, range=(-1, 1))
        self.assertAllClose(counts / u.size, np.full(10, 0.1), atol=0.01)

    def test_start_is_clipped_to_the_pixel_range(self):
        start = self._start([5, 7])
        high, low = start[:4, :4], start[4:8, :4]  # clean pixels 255 and 0
        self.assertEqual(high.max(), 255.0)
        self.assertEqual(low.min(), 0.0)
        self.assertGreaterEqual(high.min(), 255.0 - self.EPS)
        self.assertLessEqual(low.max(), self.EPS)
        # Half the draws leave the range and are clipped onto its edge.
        self.assertAllClose(np.mean(high == 255.0), 0.5, atol=0.08)
        self.assertAllClose(np.mean(low == 0.0), 0.5, atol=0.08)

    def test_start_depends_on_the_seed_only(self):
        a, b = self._start([5, 7]), self._start([5, 7])
        self.assertAllEqual(a, b)
        inner = (self.images > 0) & (self.images < 255)  # saturated pixels clip alike
        for other in ([5, 8], [6, 7]):
            self.assertLess(np.mean(self._start(other)[inner] == a[inner]), 0.01, msg=str(other))

    def test_no_random_start_no_gradient_returns_the_input(self):
        self.assertAllEqual(self._start([5, 7], random_init=False), self.images)


class AttackTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = mt.small_model()
        images, labels = mt.fixed_batches(31, 32)
        # Brief real training (momentum SGD, clean batches, main branch) so the
        # loss surface is not flat; the attacks below use that branch.
        ctx = mt.make_context(cls.model, learning_rate=0.1, batch_size=32)
        run = mt.step_runner(ctx, "vanilla")
        iterator = mt.batch_iterator(images[:30], labels[:30])
        for _ in range(30):
            run(iterator)
        cls.images, cls.labels = images[30], labels[30]
        # Saturated pixels exercise the [0, 255] clip.
        cls.images[:4, :3] = 255.0
        cls.images[4:8, :3] = 0.0

    def test_stays_within_eps_ball_and_pixel_range(self):
        for eps, steps, step_size in [(3.0, 1, None), (8.0, 1, None), (6.0, 4, 2.5)]:
            adv = _attack(
                self.model, self.images, self.labels, eps=eps, num_steps=steps, step_size=step_size
            )
            self.assertLessEqual(np.abs(adv - self.images).max(), eps + 1e-4)
            self.assertGreaterEqual(adv.min(), 0.0)
            self.assertLessEqual(adv.max(), 255.0)
            # One signed step from a random start reaches the boundary almost everywhere.
            self.assertGreater(np.abs(adv - self.images).max(), eps - 1e-3)

    def test_zero_eps_returns_the_input(self):
        for init in (True, False):
            adv = _attack(self.model, self.images, self.labels, eps=0.0, random_init=init)
            self.assertAllEqual(adv, self.images)

    def test_attack_raises_the_loss(self):
        def mean_loss(x):
            logits = self.model(tf.constant(x), training=False)
            return float(tf.reduce_mean(losses.cross_entropy(self.labels, logits)))

        clean = mean_loss(self.images)
        for config in [dict(eps=8.0), dict(eps=8.0, num_steps=3, step_size=4.0)]:
            adv = _attack(self.model, self.images, self.labels, **config)
            self.assertGreater(mean_loss(adv), clean + 0.05, msg=str(config))
        # Random noise of the same size is far less harmful than the attack.
        noise = np.clip(
            self.images + np.sign(np.random.default_rng(0).normal(size=self.images.shape)) * 8.0,
            0,
            255,
        ).astype(np.float32)
        adv = _attack(self.model, self.images, self.labels, eps=8.0)
        self.assertGreater(mean_loss(adv) - clean, 2 * abs(mean_loss(noise) - clean))

    def test_random_target_lowers_the_target_loss(self):
        adv = _attack(
            self.model,
            self.images,
            self.labels,
            eps=8.0,
            target="random",
            num_steps=3,
            step_size=4.0,
        )
        targets = attack_lib.random_wrong_labels(
            tf.constant(self.labels),
            mt.NUM_CLASSES,
            tf.random.experimental.stateless_split(tf.constant([5, 7], tf.int64), 2, alg="philox")[
                1
            ],
        ).numpy()
        self.assertFalse(np.any(targets == self.labels))
        before = losses.cross_entropy(
            targets, self.model(tf.constant(self.images), training=True, update_stats=False)
        )
        after = losses.cross_entropy(
            targets, self.model(tf.constant(adv), training=True, update_stats=False)
        )
        self.assertLess(float(tf.reduce_mean(after)), float(tf.reduce_mean(before)))

    def test_attack_changes_no_variable(self):
        before = mt.snapshot(self.model)
        for branch in ("aux", "main"):
            _attack(
                self.model,
                self.images,
                self.labels,
                eps=8.0,
                bn_branch=branch,
                num_steps=2,
                step_size=4.0,
            )
        for old, var in zip(before, self.model.variables):
            self.assertAllEqual(old, var.numpy(), msg=var.path)

    def test_same_seed_same_attack(self):
        a = _attack(self.model, self.images, self.labels, eps=8.0)
        b = _attack(self.model, self.images, self.labels, eps=8.0)
        self.assertAllEqual(a, b)

    def test_bad_config_is_rejected(self):
        with self.assertRaisesRegex(ValueError, "eps"):
            attack_lib.AttackConfig(eps=-1.0)
        with self.assertRaisesRegex(ValueError, "bn_branch"):
            attack_lib.AttackConfig(bn_branch="both")


if __name__ == "__main__":
    tf.test.main()
