"""Robust evaluation: top-1/top-5 of the main branch under K-step L∞ PGD with random start."""

import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from conadv.attack import AttackConfig
from conadv.trainer import TrainConfig, Trainer
from input_pipeline import registry
from input_pipeline.base import EVAL
from tests.child_process import TINY_RESNET, run_main


def digits_trainer(model_dir, eval_attack=None):
    config = TrainConfig(
        model_dir=model_dir,
        method="vanilla",
        model="resnet20",
        width_multiplier=0.5,
        global_batch_size=256,
        eval_batch_size=180,
        train_steps=80,
        steps_per_loop=20,
        optimizer="momentum",
        learning_rate=0.5,
        warmup_epochs=1.0,
        lr_schedule="poly",
        weight_decay=5e-4,
        eval_attack=eval_attack,
        seed=2,
    )
    source = registry.get_source("digits", image_size=16)
    return Trainer(config, tf.distribute.get_strategy(), source)


class RobustEvaluationTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = tempfile.mkdtemp()
        trainer = digits_trainer(cls.model_dir)
        trainer.train(evaluate=False)
        cls.clean = trainer.evaluate()

    def robust(self, eps, steps=5):
        trainer = digits_trainer(
            self.model_dir, AttackConfig(eps=eps, num_steps=steps, bn_branch="main")
        )
        trainer.restore()
        return trainer.evaluate()

    def test_model_learned(self):
        # Otherwise "robust ≤ clean" would say little.
        self.assertGreater(self.clean["top1"], 0.9)

    def test_zero_budget_is_clean_accuracy(self):
        result = self.robust(0.0)
        self.assertEqual(result["robust_top1"], result["top1"])
        self.assertEqual(result["robust_top5"], result["top5"])
        self.assertEqual(result["top1"], self.clean["top1"])

    def test_robust_accuracy_falls_as_the_budget_grows(self):
        results = [self.robust(eps) for eps in (2.0, 8.0, 32.0)]
        robust = [r["robust_top1"] for r in results]
        for r in results:
            self.assertEqual(r["top1"], self.clean["top1"])
            self.assertLessEqual(r["robust_top1"], r["top1"])
        self.assertLessEqual(robust[1], robust[0])
        self.assertLessEqual(robust[2], robust[1])
        # The attack really bites at the largest budget.
        self.assertLess(robust[2], self.clean["top1"] - 0.2)
        self.assertEqual(results[0]["eval_attack"], {"eps": 2.0, "steps": 5, "step_size": 1.0})


class Float16RobustEvaluationTest(tf.test.TestCase):
    def test_attack_uses_the_training_loss_scale(self):
        """Catches: robust evaluation under mixed_float16 attacking without the loss scale
        training's attack uses. The model's logits are scaled so that its float32 input
        gradients are about 1e-9: below float16's range unscaled (a one-step attack from
        the image then moves no pixel and robust equals clean), inside it at 2^10."""
        attack = AttackConfig(eps=32.0, num_steps=1, random_init=False, bn_branch="main")
        config = TrainConfig(
            model_dir=tempfile.mkdtemp(dir=self.get_temp_dir()),
            method="vanilla",
            model="resnet20",
            width_multiplier=0.25,
            precision="mixed_float16",
            eval_batch_size=360,
            eval_attack=attack,
            precise_bn_batches=0,
            seed=3,
        )
        source = registry.get_source("digits", image_size=16)
        trainer = Trainer(config, tf.distribute.get_strategy(), source)
        images, labels = next(iter(source.dataset(EVAL, 360)))
        logits_layer = [
            layer
            for layer in trainer.model._flatten_layers()
            if isinstance(layer, keras.layers.Dense)
        ][-1]

        def input_gradients():
            """|d summed CE / d pixel| as the float16 model computes it, loss unscaled."""
            with tf.GradientTape() as tape:
                tape.watch(images)
                logits = tf.cast(trainer.model(images, training=False), tf.float32)
                loss = tf.reduce_sum(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
            return np.abs(tape.gradient(loss, images).numpy())

        # The input gradient is linear in the logits kernel (eval mode): scale it so the
        # median gradient becomes 1e-9.
        before = input_gradients()
        kernel = logits_layer.kernel
        kernel.assign(kernel * (1e-9 / np.median(before[before > 0])))
        self.assertGreater(np.mean(input_gradients() == 0), 0.5)  # float16 flushes them
        result = trainer.evaluate()
        # The attack moved pixels enough to change predictions (an attack that moves
        # nothing gives exactly the clean numbers).
        changed = max(
            abs(result["robust_top1"] - result["top1"]), abs(result["robust_top5"] - result["top5"])
        )
        self.assertGreater(changed, 0.02)


class RobustEvaluationMainTest(tf.test.TestCase):
    def test_eval_mode_writes_robust_numbers(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        run_main(
            *TINY_RESNET,
            "--method=vanilla",
            "--train_steps=2",
            "--mode=train",
            f"--model_dir={model_dir}",
        )
        proc = run_main(
            *TINY_RESNET,
            "--method=vanilla",
            "--train_steps=2",
            "--mode=eval",
            "--eval_attack_eps=4",
            "--eval_attack_steps=2",
            f"--model_dir={model_dir}",
        )
        with open(os.path.join(model_dir, "eval.json")) as f:
            result = json.load(f)
        self.assertEqual(result["eval_attack"], {"eps": 4.0, "steps": 2, "step_size": 5.0})
        self.assertLessEqual(result["robust_top1"], result["top1"])
        self.assertIn("robust top1", proc.stdout)


if __name__ == "__main__":
    tf.test.main()
