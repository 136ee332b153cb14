"""Run identity: a --model_dir holds one run; default directories never mix two runs."""

import glob
import json
import os
import tempfile

import tensorflow as tf
from absl import flags as absl_flags

import flags as conadv_flags
from conadv import run_identity
from conadv.run_config import RunConfig
from tests.child_process import TINY_RESNET, run_main

SHORT = (*TINY_RESNET, "--train_steps=2", "--steps_per_loop=1", "--mode=train")


def progress_steps(proc):
    return [line.split(" |")[0] for line in proc.stdout.splitlines() if line.startswith("step ")]


class FlagCategoriesTest(tf.test.TestCase):
    def test_every_flag_is_defining_or_resumable_and_the_help_lists_the_resumable(self):
        values = absl_flags.FlagValues()
        conadv_flags.define_all(values)
        ours = set(values)  # only the project's flags are defined here
        defining, resumable = set(run_identity.DEFINING_FLAGS), set(run_identity.RESUMABLE_FLAGS)
        self.assertEqual(defining & resumable, set())
        # verbosity is absl's own; model_dir is the run's address.
        self.assertEqual(ours - defining - resumable, {"model_dir"})
        help_text = values["model_dir"].help
        for name in resumable - {"eval_attack_eps", "eval_attack_steps", "eval_attack_step_size"}:
            if name in ("tfds_download",):
                continue
            self.assertIn(f"--{name}", help_text, name)
        self.assertIn("--eval_attack_*", help_text)


class RunConfigTest(tf.test.TestCase):
    def parse(self, *args):
        values = absl_flags.FlagValues()
        conadv_flags.define_all(values)
        values(["prog", *args])
        return values

    def test_the_flags_become_one_object_that_round_trips_through_json(self):
        values = self.parse(
            "--attack_eps=6",
            "--attack_steps=3",
            "--eval_attack_eps=2",
            "--accumulation_steps=2",
            "--augment=randaugment",
            "--seed=9",
            "--model_dir=/tmp/somewhere",
        )
        run = RunConfig.from_flags(values)
        # Each consumer's settings, taken from the flags once.
        self.assertEqual((run.train.attack.eps, run.train.attack.num_steps), (6.0, 3))
        self.assertEqual(run.train.attack.alpha, 2.5 * 6.0 / 3)  # the K > 1 default step
        self.assertEqual(run.train.eval_attack.bn_branch, "main")
        self.assertEqual(run.train.accumulation_steps, 2)
        self.assertEqual((run.data.pipeline.augment, run.data.pipeline.seed), ("randaugment", 9))
        self.assertEqual(run.model_dir, "/tmp/somewhere")
        path = os.path.join(self.get_temp_dir(), "run_config.json")
        run.write(path)
        self.assertEqual(RunConfig.read(path), run)

    def test_bad_flags_stop_before_anything_is_built(self):
        from flags.validation import FlagError

        with self.assertRaisesRegex(FlagError, "--accumulation_steps=0 must be at least 1"):
            RunConfig.from_flags(self.parse("--accumulation_steps=0"))
        with self.assertRaisesRegex(FlagError, r"--target_accuracy=75.9 .*\(0.759, not 75.9\)"):
            RunConfig.from_flags(self.parse("--target_accuracy=75.9"))


class RunIdentityTest(tf.test.TestCase):
    def test_default_runs_with_different_settings_get_different_directories(self):
        tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
        first = run_main(*SHORT, env={"TMPDIR": tmp})
        second = run_main(*SHORT, "--attack_eps=8", env={"TMPDIR": tmp})
        directories = sorted(glob.glob(os.path.join(tmp, "conadv", "digits_resnet20_conadv_*")))
        self.assertLen(directories, 2)
        # The second run trained from step 0, not "resumed" the first.
        self.assertEqual(progress_steps(first), ["step 1/2", "step 2/2"])
        self.assertEqual(progress_steps(second), ["step 1/2", "step 2/2"])
        recorded = []
        for directory in directories:
            with open(os.path.join(directory, run_identity.RUN_CONFIG)) as f:
                recorded.append(json.load(f)["flags"]["attack_eps"])
            # run_config.json is the run object itself: it reads back into a
            # RunConfig whose attack is the one the flags asked for.
            run = RunConfig.read(os.path.join(directory, run_identity.RUN_CONFIG))
            self.assertEqual(run.train.attack.eps, run.flags["attack_eps"])
            self.assertEqual(run.model_dir, directory)
        self.assertEqual(sorted(recorded), [4.0, 8.0])

    def test_explicit_directory_refuses_a_changed_defining_flag_and_resumes_otherwise(self):
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        run_main(*SHORT, f"--model_dir={model_dir}")
        proc = run_main(
            *SHORT, f"--model_dir={model_dir}", "--attack_eps=8", "--seed=3", expect_ok=False
        )
        self.assertEqual(proc.returncode, 2)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertEqual(
            last,
            f"error: --model_dir={model_dir} was trained with --attack_eps=4, not 8; "
            "--seed=0, not 3; use a new --model_dir (or the flags it was trained with)",
        )
        # --train_steps upward (and other resumable flags) continue the same run.
        resumed = run_main(
            *TINY_RESNET,
            "--train_steps=4",
            "--steps_per_loop=2",
            "--mode=train",
            f"--model_dir={model_dir}",
        )
        self.assertEqual(progress_steps(resumed), ["step 4/4"])


if __name__ == "__main__":
    tf.test.main()
