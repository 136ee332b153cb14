"""Preemption: SIGTERM saves at the current step and exits; SIGKILLed runs resume exactly."""

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from conadv.run.preemption import EXIT_CODE
from tests.child_process import ROOT, TINY_RESNET, run_main

MAIN = os.path.join(ROOT, "main.py")
KILL_TOLERANCE = 1e-5  # relative per variable: resumed runs redo the same float32 work


def start_main(*args, stderr_path):
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, MAIN, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def wait_for_line(proc, prefix, timeout=300):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
        if time.time() > deadline:
            break
    raise AssertionError(f"no line starting {prefix!r} from main.py")


def model_tensors(model_dir):
    reader = tf.train.load_checkpoint(model_dir)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.startswith("model/")
    }


class SigtermTest(tf.test.TestCase):
    def test_sigterm_saves_the_current_step_and_the_run_resumes_from_it(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        stderr_path = os.path.join(model_dir, "stderr.txt")
        args = (*TINY_RESNET, "--steps_per_loop=5", "--epochs_between_evals=1000")
        proc = start_main(
            *args, "--train_steps=400", f"--model_dir={model_dir}", stderr_path=stderr_path
        )
        try:
            wait_for_line(proc, "step 10/400")
            proc.send_signal(signal.SIGTERM)
            proc.stdout.read()
            self.assertEqual(proc.wait(timeout=120), EXIT_CODE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with open(stderr_path) as f:
            last = f.read().strip().splitlines()[-1]
        match = re.fullmatch(
            r"preempted \(SIGTERM\) at step (\d+): saved ckpt-(\d+); "
            r"run the same command again to resume",
            last,
        )
        self.assertIsNotNone(match, last)
        step = int(match.group(1))
        self.assertEqual(int(match.group(2)), step)
        self.assertTrue(10 <= step < 400, step)
        self.assertEqual(os.path.basename(tf.train.latest_checkpoint(model_dir)), f"ckpt-{step}")
        # Resumed, it continues from that step.
        resumed = run_main(*args, f"--train_steps={step + 10}", f"--model_dir={model_dir}")
        progress = [line for line in resumed.stdout.splitlines() if line.startswith("step ")]
        self.assertEqual(progress[0].split(" |")[0], f"step {step + 5}/{step + 10}")


class SigkillTest(tf.test.TestCase):
    def test_killed_and_restarted_conadv_run_ends_with_the_uninterrupted_weights(self):
        args = (
            *TINY_RESNET,
            "--method=conadv",
            "--staleness=1",
            "--train_steps=30",
            "--steps_per_loop=3",
            "--checkpoint_steps=3",
            "--mode=train",
        )
        reference_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        run_main(*args, f"--model_dir={reference_dir}")
        reference = model_tensors(reference_dir)

        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        rng = random.Random(7)
        kills = 0
        for _ in range(5):  # at most 3 kills, then the run is left to finish
            proc = start_main(
                *args, f"--model_dir={model_dir}", stderr_path=os.path.join(model_dir, "stderr.txt")
            )
            try:
                # After the run's first checkpoint, at a random later moment.
                start = tf.train.latest_checkpoint(model_dir)
                deadline = time.time() + 300
                while tf.train.latest_checkpoint(model_dir) == start and proc.poll() is None:
                    if time.time() > deadline:
                        raise AssertionError("no checkpoint written")
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 2.0))
                if proc.poll() is None and kills < 3:
                    proc.kill()
                    kills += 1
                proc.stdout.read()
                if proc.wait(timeout=120) == 0:
                    break
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.assertGreaterEqual(kills, 1)
        self.assertEqual(os.path.basename(tf.train.latest_checkpoint(model_dir)), "ckpt-30")
        final = model_tensors(model_dir)
        self.assertEqual(set(final), set(reference))
        worst = max(
            float(np.max(np.abs(final[k] - reference[k])) / (np.max(np.abs(reference[k])) + 1e-6))
            for k in reference
        )
        self.assertLess(worst, KILL_TOLERANCE)


if __name__ == "__main__":
    tf.test.main()


class InterruptedWriteTest(tf.test.TestCase):
    def test_a_restart_removes_the_temporary_state_file_of_a_killed_save(self):
        """Catches: the temporary left behind, or the complete state file removed with it."""
        from conadv.run.run_files import RunFiles

        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        for name in ("checkpoint", "checkpoint.tmp9e620d35", "ckpt-3.index"):
            with open(os.path.join(model_dir, name), "w") as f:
                f.write("x")
        RunFiles(model_dir, tf.distribute.get_strategy()).remove_interrupted_writes()
        self.assertEqual(sorted(os.listdir(model_dir)), ["checkpoint", "ckpt-3.index"])
