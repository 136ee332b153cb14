"""Robust evaluation: top-1/top-5 of the main branch under K-step L∞ PGD with random start."""

import json
import os
import tempfile

import tensorflow as tf

from conadv.attack import AttackConfig
from conadv.trainer import TrainConfig, Trainer
from input_pipeline import registry
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
