"""The L∞ PGD attack: bounds, effect on the loss, and that it changes no variable."""

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
