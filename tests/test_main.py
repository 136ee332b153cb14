"""main.py end to end, as a user runs it: training, checkpoints, resuming, bad flags."""

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from tests.child_process import TINY_RESNET, run_for_result, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    *TINY_RESNET,
    "--image_size=16",
    "--eval_batch_size=64",
    "--learning_rate=1.0",
    "--warmup_epochs=0",
]
SYNTHETIC = ["--dataset=synthetic", "--num_classes=10", "--batch_size=16", *SMALL]


def tree(path):
    """Every directory and file under ``path``, a file with its bytes (None: no ``path``)."""
    if not os.path.exists(path):
        return None
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), path) + "/"] = None
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(f.name, path)] = f.read()
    return found


def checkpoint_steps(model_dir):
    state = tf.train.get_checkpoint_state(model_dir)
    paths = state.all_model_checkpoint_paths if state else []
    return sorted(int(p.rsplit("-", 1)[1]) for p in paths)


class TrainAndResumeTest(tf.test.TestCase):
    def test_each_method_trains_checkpoints_and_resumes(self):
        for method in ("vanilla", "disadv", "conadv"):
            model_dir = os.path.join(self.get_temp_dir(), method)
            run_main(
                *SYNTHETIC,
                f"--method={method}",
                "--train_steps=20",
                "--steps_per_loop=10",
                "--checkpoint_steps=10",
                f"--model_dir={model_dir}",
            )
            with open(os.path.join(model_dir, "summary.json")) as f:
                summary = json.load(f)
            for key in (
                "method",
                "staleness",
                "global_batch_size",
                "train_steps",
                "epochs",
                "train_top1",
                "eval_top1",
                "eval_top5",
                "images_per_second",
                "wall_time_s",
            ):
                self.assertIn(key, summary)
            self.assertEqual(summary["method"], method)
            self.assertEqual(summary["train_steps"], 20)
            self.assertEqual(summary["global_batch_size"], 16)
            self.assertEqual(checkpoint_steps(model_dir), [10, 20])
            self.assertTrue(os.path.exists(os.path.join(model_dir, "export", "model.keras")))

            # Same model_dir, more steps: resumes at 20 and runs only 20 → 30.
            proc = run_main(
                *SYNTHETIC,
                f"--method={method}",
                "--train_steps=30",
                "--steps_per_loop=10",
                "--checkpoint_steps=10",
                f"--model_dir={model_dir}",
            )
            progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
            self.assertEqual(len(progress), 1, proc.stdout)
            self.assertTrue(progress[0].startswith("step 30/30"), progress[0])
            self.assertEqual(checkpoint_steps(model_dir)[-1], 30)

        # A trained run read with --model_dir alone: its flags come from run_config.json.
        proc = run_main("--mode=sharpness", "--sharpness_examples=48", f"--model_dir={model_dir}")
        self.assertIn("top Hessian eigenvalue", proc.stdout)
        with open(os.path.join(model_dir, "sharpness.json")) as f:
            measured = json.load(f)
        self.assertEqual(measured["global_step"], 30)
        self.assertTrue(np.isfinite(measured["top_eigenvalue"]), measured)
        self.assertGreater(measured["eps_sharpness"], 0.0)
        self.assertEqual(measured["examples"], 48)
        proc = run_main("--mode=eval", f"--model_dir={model_dir}")
        self.assertIn("eval at step 30", proc.stdout)
        proc = run_main(
            "--mode=eval", "--attack_eps=2", f"--model_dir={model_dir}", expect_ok=False
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn("was trained with --attack_eps=", proc.stderr)

        # Another architecture on this model_dir is refused in one line, not a
        # traceback: by the run identity, and (for a directory without
        # run_config.json, e.g. from an older version) by the checkpoint itself.
        args = [a for a in SYNTHETIC if not a.startswith("--width")]
        refused = (
            *args,
            "--width_multiplier=0.5",
            "--method=conadv",
            "--train_steps=40",
            f"--model_dir={model_dir}",
        )
        proc = run_main(*refused, expect_ok=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("was trained with --width_multiplier=0.25, not 0.5", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        os.remove(os.path.join(model_dir, "run_config.json"))
        proc = run_main(*refused, expect_ok=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("does not fit this model", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)

    def test_interrupted_conadv_run_resumes_exactly(self):
        """6 steps at once equal 3 steps, a restart, then 3 more (ring and data restored)."""
        common = [
            "--dataset=digits",
            "--method=conadv",
            "--batch_size=32",
            "--steps_per_loop=3",
            "--mode=train",
            *SMALL,
            # Flat over these steps: the learning rate must not depend on --train_steps.
            "--lr_schedule=step",
        ]
        straight = os.path.join(self.get_temp_dir(), "straight")
        resumed = os.path.join(self.get_temp_dir(), "resumed")
        run_main(*common, "--train_steps=6", f"--model_dir={straight}")
        run_main(*common, "--train_steps=3", f"--model_dir={resumed}")
        run_main(*common, "--train_steps=6", f"--model_dir={resumed}")
        a = tf.train.load_checkpoint(tf.train.latest_checkpoint(straight))
        b = tf.train.load_checkpoint(tf.train.latest_checkpoint(resumed))
        shapes = a.get_variable_to_shape_map()
        names = [
            n
            for n in shapes
            if n.split("/")[0] not in ("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")
        ]
        # Every variable of ResNet-8 (both BatchNorm branches, moving statistics), the
        # optimizer's state and the ring: at least 47 tensors; a checkpoint missing a
        # part has fewer.
        self.assertGreaterEqual(len(names), 47)
        for name in names:
            self.assertAllClose(
                a.get_tensor(name), b.get_tensor(name), rtol=1e-5, atol=1e-6, msg=name
            )
        # Training really happened between the two halves.
        first_half = tf.train.load_checkpoint(os.path.join(resumed, "ckpt-3"))
        kernel = next(n for n in names if len(shapes[n]) == 4 and "ring" not in n)
        self.assertGreater(np.abs(first_half.get_tensor(kernel) - b.get_tensor(kernel)).max(), 0)


class MirroredMainTest(tf.test.TestCase):
    def test_conadv_on_two_logical_devices_trains_checkpoints_and_evaluates(self):
        model_dir = os.path.join(self.get_temp_dir(), "mirrored")
        run_main(
            *SYNTHETIC,
            "--num_cpu_devices=2",
            "--distribution_strategy=mirrored",
            "--train_steps=4",
            "--steps_per_loop=2",
            "--eval_batch_size=48",
            f"--model_dir={model_dir}",
        )
        with open(os.path.join(model_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["train_steps"], 4)
        self.assertEqual(checkpoint_steps(model_dir), [4])
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
        rings = [n for n in reader.get_variable_to_shape_map() if "adversarial" in n]
        self.assertLen(rings, 2)  # one ring per replica


#: Runs main.run_main for each (model_dir, mode) of argv[1]; RESULT: each one-line error.
READING_MODES_PROGRAM = """
import json, sys
from absl import flags as absl_flags
import flags as conadv_flags
import main
messages = []
for model_dir, mode in json.loads(sys.argv[1]):
    values = absl_flags.FlagValues()
    conadv_flags.define_all(values)
    values(["main.py", f"--mode={mode}", f"--model_dir={model_dir}"])
    try:
        main.run_main(values)
        messages.append(None)
    except main.FlagError as error:
        messages.append(str(error))
print("RESULT " + json.dumps({"messages": messages}))
"""


class ReadingModeWithoutRunTest(tf.test.TestCase):
    """eval, export and sharpness on a --model_dir that holds no trained run.

    Catches: the directory, run_config.json, log.txt or the summary directories
    created before the checkpoint is looked for, so that the failed reading mode
    leaves a run "trained with" its flags behind and training there is refused.
    """

    def test_refused_in_one_line_leaving_the_directory_as_it_was(self):
        base = tempfile.mkdtemp(dir=self.get_temp_dir())
        missing, empty, other = (os.path.join(base, name) for name in ("a", "b", "c"))
        os.mkdir(empty)
        os.makedirs(os.path.join(other, "notes"))
        with open(os.path.join(other, "notes", "readme.txt"), "w") as f:
            f.write("not a run\n")
        cases = [(d, m) for d in (missing, empty, other) for m in ("eval", "export", "sharpness")]
        before = {d: tree(d) for d in (missing, empty, other)}
        # One interpreter for the nine cases (main.py in-process; its flags are global
        # there, so not in this pytest worker, which may hold other programs' flags).
        result = run_for_result("-c", READING_MODES_PROGRAM, json.dumps(cases))
        for (model_dir, mode), message in zip(cases, result["messages"]):
            self.assertIn(f"--mode={mode}: no checkpoint in --model_dir={model_dir}", message)
            self.assertIn("train there first", message)
            self.assertNotIn("\n", message)
        for model_dir, was in before.items():
            self.assertEqual(tree(model_dir), was, model_dir)
        self.assertFalse(os.path.exists(missing))

        # Training there (with flags other than the defaults the reading modes saw) works.
        run_main(
            *SYNTHETIC,
            "--mode=train",
            "--method=vanilla",
            "--train_steps=1",
            "--steps_per_loop=1",
            "--precise_bn_batches=1",
            f"--model_dir={other}",
        )
        self.assertEqual(checkpoint_steps(other), [1])


class BadFlagsTest(tf.test.TestCase):
    CASES = [
        (
            ["--num_cpu_devices=2", "--distribution_strategy=mirrored", "--batch_size=15"],
            "--batch_size",
        ),
        (["--attack_eps=-1"], "--attack_eps"),
        (["--method=conadv", "--staleness=0"], "--staleness"),
        (["--model=resnet51"], "--model"),
        (["--dataset=mnist_typo"], "--dataset"),
        (["--dataset=imagenet"], "--data_dir"),
        (["--dataset=imagenet", "--data_dir=/nonexistent/imagenet"], "--data_dir"),
        (["--model=resnet50", "--image_size=16"], "--image_size"),
        (["--mode=export"], "--mode=export: no checkpoint"),
    ]

    def test_each_bad_combination_exits_with_one_line_naming_the_flag(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        for args, flag in self.CASES:
            proc = run_main(*args, f"--model_dir={model_dir}", expect_ok=False)
            self.assertEqual(proc.returncode, 2, args)
            self.assertEqual(tree(model_dir), {}, args)  # nothing written (not even a log)
            # TensorFlow's own start-up lines may mention "errors" (oneDNN's note on
            # round-off): the project's message is the one line starting "error:", last.
            lines = proc.stderr.strip().splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            self.assertEqual(len(errors), 1, f"{args}: {proc.stderr[-2000:]}")
            self.assertEqual(lines[-1], errors[0], args)
            self.assertIn(flag, errors[0], args)
            self.assertNotIn("Traceback", proc.stderr, args)


if __name__ == "__main__":
    tf.test.main()
