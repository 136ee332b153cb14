"""``--mlperf_log``: a short run's log passes the mlperf-logging compliance checker
(training ruleset 4.0.0, the last with ResNet) on every rule but the accuracy target."""

import json
import os
import re
import subprocess
import sys

import tensorflow as tf

from tests.child_process import TINY_RESNET, run_main

RULESET = "4.0.0"
#: The checker's one objection a short run must have: ResNet's target top-1.
ACCURACY_RULE = "Failed checks for eval_accuracy : v['value'] >= 0.7590 and v['value'] < 1.0"


def check(log_path, cwd):
    """The compliance checker's (exit code, messages) on ``log_path``."""
    proc = subprocess.run(
        [
            sys.executable,
            *("-m", "mlperf_logging.compliance_checker"),
            *("--usage", "training", "--ruleset", RULESET),
            log_path,
        ],
        cwd=cwd,  # it writes compliance_checker.log where it runs
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stderr


def events(log_path):
    with open(log_path) as f:
        return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in f if ":::MLLOG " in line]


class MLPerfLogTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tf.compat.v1.test.get_temp_dir()
        cls.log = os.path.join(cls.dir, "mlperf.log")
        cls.model_dir = os.path.join(cls.dir, "run")
        # Closed-division hyperparameters: LARS, weight decay 1e-4 (= 1e-4·2^0),
        # poly power 2, end learning rate 1e-4. 1437 digits / batch 256 = 5
        # steps per epoch; an evaluation every 3 steps.
        run_main(
            *TINY_RESNET,
            "--image_size=16",
            "--batch_size=256",
            "--eval_batch_size=64",
            "--train_steps=6",
            "--steps_per_loop=3",
            "--epochs_between_evals=0.6",
            "--optimizer=lars",
            "--weight_decay=1e-4",
            "--end_learning_rate=0.0001",
            "--poly_power=2",
            "--learning_rate=5",
            "--warmup_epochs=0.1",
            "--target_accuracy=0.05",
            f"--mlperf_log={cls.log}",
            # ConAdv's default division is open; closed is what the checker
            # holds to the reference's hyperparameter rules.
            "--mlperf_division=closed",
            f"--model_dir={cls.model_dir}",
        )

    def test_only_the_accuracy_target_fails_the_checker(self):
        code, messages = check(self.log, self.dir)
        failures = [line for line in messages.splitlines() if line.startswith(("WARNING", "ERROR"))]
        self.assertEqual(code, 1, messages)
        self.assertEqual(failures, [f"WARNING -  {ACCURACY_RULE}", "ERROR - FAILED"], messages)

    def test_the_checker_rejects_the_paper_s_weight_decay(self):
        """Control: the same log with the paper's weight decay 5e-4 (not 1e-4·2^k)
        fails another rule, so the checker above did check the hyperparameters."""
        with open(self.log) as f:
            text = f.read()
        changed = re.sub(
            r'("key": "lars_opt_weight_decay", "value": )[0-9.e-]+', r"\g<1>0.0005", text
        )
        self.assertNotEqual(changed, text)
        paper = os.path.join(self.dir, "paper_weight_decay.log")
        with open(paper, "w") as f:
            f.write(changed)
        code, messages = check(paper, self.dir)
        self.assertEqual(code, 1)
        self.assertIn("lars_opt_weight_decay", messages)

    def test_events_follow_the_run(self):
        log = events(self.log)
        keys = [e["key"] for e in log]
        for key in ("init_start", "init_stop", "run_start", "run_stop", "global_batch_size"):
            self.assertEqual(keys.count(key), 1, key)
        self.assertLess(keys.index("init_stop"), keys.index("run_start"))
        # Two evaluations (steps 3 and 6), each closing a block of training.
        accuracy = [e for e in log if e["key"] == "eval_accuracy"]
        self.assertLen(accuracy, 2)
        self.assertEqual(keys.count("block_start"), 2)
        self.assertEqual(keys.count("block_stop"), 2)
        # 6 steps of 5-step epochs: epoch 2 begins at step 5.
        epochs = [(e["key"], e["metadata"]["epoch_num"]) for e in log if "epoch_" in e["key"]]
        self.assertEqual(
            epochs,
            [("epoch_start", 1), ("epoch_stop", 1), ("epoch_start", 2), ("epoch_stop", 2)],
        )
        with open(os.path.join(self.model_dir, "eval", "..", "summary.json")) as f:
            summary = json.load(f)
        self.assertAlmostEqual(accuracy[-1]["value"], summary["eval_top1"], places=6)
        value = {e["key"]: e["value"] for e in log}
        self.assertEqual(value["global_batch_size"], 256)
        self.assertEqual(value["gradient_accumulation_steps"], 1)
        self.assertEqual(value["train_samples"], 1437)
        self.assertEqual(value["eval_samples"], 360)
        self.assertEqual(value["opt_name"], "lars")
        self.assertEqual(value["lars_opt_weight_decay"], 1e-4)
        # The run reached --target_accuracy=0.05 at its first evaluation.
        stop = next(e for e in log if e["key"] == "run_stop")
        self.assertEqual(stop["metadata"]["status"], "success")
        self.assertGreater(summary["time_to_target_s"], 0)
        self.assertLess(summary["time_to_target_s"], summary["wall_time_s"])


if __name__ == "__main__":
    tf.test.main()
