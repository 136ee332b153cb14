"""Run identity: a --model_dir holds one run; default directories never mix two runs;
a resume that re-plans the learning-rate schedule says so and records it."""

import contextlib
import glob
import io
import json
import math
import os
import tempfile

import tensorflow as tf
from absl import flags as absl_flags

import flags as conadv_flags
from conadv.run import run_identity
from conadv.run_config import RunConfig
from tests.child_process import TINY_RESNET, run_main

#: One warmup step (0.2 epochs of 5 steps), so step 2 is already in the poly decay.
SHORT = (
    *TINY_RESNET,
    "--train_steps=2",
    "--steps_per_loop=1",
    "--mode=train",
    "--warmup_epochs=0.2",
)


def reference_lr(
    step, total, steps_per_epoch, schedule="poly", peak=20.0, end=1e-4, warmup_epochs=2.0, power=2.0
):
    """The documented formulas (official/schedules.py, docs/design.md), in plain Python:
    linear warmup to the peak over min(warmup_epochs in steps, total), then
    end + (peak − end)·(1 − p)^power (poly) or end + (peak − end)·½(1 + cos πp)
    (cosine), p = (step − warmup)/(total − warmup) clipped to [0, 1]."""
    warmup = min(round(warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return peak * step / warmup
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if schedule == "poly":
        return end + (peak - end) * (1.0 - p) ** power
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def parse_main(*args):
    values = absl_flags.FlagValues()
    conadv_flags.define_all(values)
    values(["main.py", *args])
    return values


def read_run_config(model_dir):
    with open(os.path.join(model_dir, run_identity.RUN_CONFIG)) as f:
        return json.load(f)


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
    def test_the_selection_set_defines_a_run_and_leaves_runs_without_it_as_they_were(self):
        """Catches: a run held out of 200 examples given the hash (and --model_dir) of one
        trained on all of them; --selection_seed ignored; a run without a selection set
        given a new hash because the flags were added (its finished run would be lost)."""
        values = run_identity.defining_values(parse_main())
        before = {k: v for k, v in values.items() if not k.startswith("selection_")}
        plain = run_identity.run_hash(run_identity.relevant_values(values))
        self.assertEqual(plain, run_identity.run_hash(run_identity.relevant_values(before)))
        self.assertEqual(run_identity.run_hash(values), run_identity.run_hash(before))
        held = {**values, "selection_examples": 200.0}
        other_part = {**held, "selection_seed": 1}
        hashes = {
            run_identity.run_hash(run_identity.relevant_values(v))
            for v in (values, held, other_part)
        }
        self.assertLen(hashes, 3)
        # Without a selection set its seed selects nothing: the same run.
        unused = {**values, "selection_seed": 1}
        self.assertEqual(plain, run_identity.run_hash(run_identity.relevant_values(unused)))

    def test_a_run_recorded_before_the_selection_flags_is_not_resumed_with_a_selection(self):
        """Catches: flags missing from an older run_config.json skipped in the comparison:
        the run, which trained on every example, would be resumed holding 10 out and report
        a selection top-1 on examples it trained on."""
        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        old = RunConfig.from_flags(parse_main(f"--model_dir={model_dir}"))
        path = old.write(os.path.join(model_dir, run_identity.RUN_CONFIG)) or os.path.join(
            model_dir, run_identity.RUN_CONFIG
        )
        with open(path) as f:
            stored = json.load(f)
        for name in ("selection_examples", "selection_seed"):
            del stored["flags"][name]  # as written before the flags existed
        with open(path, "w") as f:
            json.dump(stored, f)
        run_identity.check_or_record(old)  # the same run resumes
        held = RunConfig.from_flags(
            parse_main(f"--model_dir={model_dir}", "--selection_examples=10")
        )
        with self.assertRaisesRegex(
            run_identity.RunMismatchError, "--selection_examples=0, not 10"
        ) as caught:
            run_identity.check_or_record(held)
        self.assertNotIn("\n", str(caught.exception))

    def test_default_runs_with_different_settings_get_different_directories(self):
        tmp = tempfile.mkdtemp(dir=self.get_temp_dir())
        first = run_main(*SHORT, env={"TMPDIR": tmp})
        second = run_main(*SHORT, "--attack_eps=8", env={"TMPDIR": tmp})
        directories = sorted(glob.glob(os.path.join(tmp, "conadv", "digits_resnet8_conadv_*")))
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
        # The first start recorded the length the trainer planned the decay over.
        recorded = read_run_config(model_dir)
        self.assertEqual((recorded["schedule_steps"], recorded["schedule_changes"]), (2, []))
        # --train_steps upward (and other resumable flags) continue the same run,
        # re-planning the poly decay over 4 steps from step 2: said in one line
        # whose learning rates are the old and new plans' at step 2, recorded.
        resumed = run_main(
            *TINY_RESNET,
            "--train_steps=4",
            "--steps_per_loop=2",
            "--mode=train",
            "--warmup_epochs=0.2",
            f"--model_dir={model_dir}",
        )
        self.assertEqual(progress_steps(resumed), ["step 4/4"])
        new, old = (
            reference_lr(2, 4, 5, warmup_epochs=0.2),
            reference_lr(2, 2, 5, warmup_epochs=0.2),
        )
        self.assertEqual((f"{new:.4g}", f"{old:.4g}"), ("8.889", "0.0001"))
        notes = [line for line in resumed.stdout.splitlines() if line.startswith("note:")]
        self.assertEqual(
            notes,
            [
                "note: --train_steps=4 changes the run's length from 2 to 4 steps on resume: "
                "the poly schedule is re-planned; learning rate at step 2 is now 8.889 "
                "(was 0.0001); recorded in run_config.json"
            ],
        )
        recorded = read_run_config(model_dir)
        self.assertEqual(recorded["schedule_steps"], 4)
        (change,) = recorded["schedule_changes"]
        self.assertEqual(
            {k: change[k] for k in ("step", "from", "to", "flag")},
            {"step": 2, "from": 2, "to": 4, "flag": "--train_steps=4"},
        )
        self.assertAllClose(
            [change["learning_rate_after"], change["learning_rate_before"]], [new, old], rtol=1e-6
        )
        # The flags it was first trained with are kept as they were.
        self.assertEqual(recorded["flags"]["train_steps"], 2)


class ScheduleChangeTest(tf.test.TestCase):
    """``check_schedule`` on a recorded run_config.json and real checkpoints (5 steps/epoch)."""

    STEPS_PER_EPOCH = 5

    def setUp(self):
        super().setUp()
        self.model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        self.step = tf.Variable(0, dtype=tf.int64)
        self.manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(step=self.step), self.model_dir, 3, checkpoint_name="ckpt"
        )

    def run_config(self, *args):
        values = absl_flags.FlagValues()
        conadv_flags.define_all(values)
        values(["prog", f"--model_dir={self.model_dir}", *args])
        return RunConfig.from_flags(values)

    def start(self, train_steps, *args):
        """What main.py does on a start that trains: the identity check, then the schedule's.

        ``train_steps`` is the trainer's length for these flags. Returns the
        printed lines, the change and run_config.json's text.
        """
        run = self.run_config(*args)
        run_identity.check_or_record(run)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            change = run_identity.check_schedule(run, self.STEPS_PER_EPOCH, train_steps)
        with open(os.path.join(self.model_dir, run_identity.RUN_CONFIG)) as f:
            text = f.read()
        return out.getvalue().splitlines(), change, text

    def checkpoint_at(self, step):
        self.step.assign(step)
        self.manager.save(checkpoint_number=step)

    def test_each_re_planning_is_said_with_the_rates_at_the_step_and_recorded(self):
        lines, _, _ = self.start(80)  # --train_epochs=16 (the default): 80 steps
        self.assertEqual(lines, [])
        self.assertEqual(read_run_config(self.model_dir)["schedule_steps"], 80)
        self.checkpoint_at(80)
        # A finished run extended to 160 steps: the decay starts again from
        # the new plan's value at step 80, far above the end learning rate.
        lines, change, _ = self.start(160, "--train_steps=160")
        new, old = reference_lr(80, 160, 5), reference_lr(80, 80, 5)
        self.assertEqual((f"{new:.4g}", f"{old:.4g}"), ("5.689", "0.0001"))
        self.assertEqual(
            lines,
            [
                "note: --train_steps=160 changes the run's length from 80 to 160 steps on "
                "resume: the poly schedule is re-planned; learning rate at step 80 is now "
                "5.689 (was 0.0001); recorded in run_config.json"
            ],
        )
        # Preempted at 120, then extended again by epochs: the change is from
        # the plan in force (160), not from the first start's flags (80).
        self.checkpoint_at(120)
        lines, change, _ = self.start(200, "--train_epochs=40")
        new, old = reference_lr(120, 200, 5), reference_lr(120, 160, 5)
        self.assertEqual(
            lines,
            [
                "note: --train_epochs=40 changes the run's length from 160 to 200 steps on "
                f"resume: the poly schedule is re-planned; learning rate at step 120 is now "
                f"{new:.4g} (was {old:.4g}); recorded in run_config.json"
            ],
        )
        recorded = read_run_config(self.model_dir)
        self.assertEqual(recorded["schedule_steps"], 200)
        changes = recorded["schedule_changes"]
        self.assertEqual(
            [{k: c[k] for k in ("step", "from", "to", "flag")} for c in changes],
            [
                {"step": 80, "from": 80, "to": 160, "flag": "--train_steps=160"},
                {"step": 120, "from": 160, "to": 200, "flag": "--train_epochs=40"},
            ],
        )
        self.assertAllClose(
            [[c["learning_rate_before"], c["learning_rate_after"]] for c in changes],
            [
                [reference_lr(80, 80, 5), reference_lr(80, 160, 5)],
                [reference_lr(120, 160, 5), reference_lr(120, 200, 5)],
            ],
            rtol=1e-5,
        )
        self.assertEqual(change, changes[-1])
        # The recorded file still reads back as the run.
        run = RunConfig.read(os.path.join(self.model_dir, run_identity.RUN_CONFIG))
        self.assertEqual((run.schedule_steps, run.schedule_changes), (200, changes))

    def test_a_shortened_cosine_run_reports_the_cosine_rates(self):
        self.start(80, "--lr_schedule=cosine")
        self.checkpoint_at(30)
        lines, change, _ = self.start(60, "--lr_schedule=cosine", "--train_steps=60")
        new, old = reference_lr(30, 60, 5, "cosine"), reference_lr(30, 80, 5, "cosine")
        self.assertLess(new, old)
        self.assertEqual(
            lines,
            [
                "note: --train_steps=60 changes the run's length from 80 to 60 steps on "
                f"resume: the cosine schedule is re-planned; learning rate at step 30 is now "
                f"{new:.4g} (was {old:.4g}); recorded in run_config.json"
            ],
        )
        self.assertAllClose(
            [change["learning_rate_before"], change["learning_rate_after"]], [old, new], rtol=1e-5
        )

    def test_restarts_that_do_not_re_plan_a_trained_schedule_print_and_record_nothing(self):
        self.start(80)
        # No checkpoint yet: nothing was trained on the old plan; the new length is kept.
        lines, change, _ = self.start(100, "--train_steps=100")
        self.assertEqual((lines, change), ([], None))
        recorded = read_run_config(self.model_dir)
        self.assertEqual((recorded["schedule_steps"], recorded["schedule_changes"]), (100, []))
        self.checkpoint_at(80)
        _, _, before = self.start(100, "--train_steps=100")  # the same length
        for train_steps, args in [
            (100, ["--train_steps=100"]),  # unchanged, again
            (100, ["--train_epochs=20"]),  # the same length, by epochs
            (50, ["--train_steps=50"]),  # shorter than the step reached: nothing to train
            (80, ["--train_steps=80"]),  # ends at the step reached: nothing to train
        ]:
            lines, change, text = self.start(train_steps, *args)
            self.assertEqual((lines, change), ([], None), args)
            self.assertEqual(text, before, args)

    def test_a_run_config_from_before_schedule_steps_takes_the_length_from_its_flags(self):
        self.start(80)
        path = os.path.join(self.model_dir, run_identity.RUN_CONFIG)
        recorded = read_run_config(self.model_dir)
        del recorded["schedule_steps"], recorded["schedule_changes"]
        with open(path, "w") as f:
            json.dump(recorded, f)
        self.checkpoint_at(80)
        lines, change, _ = self.start(160, "--train_steps=160")
        self.assertLen(lines, 1)
        self.assertEqual((change["from"], change["to"]), (80, 160))
        self.assertAllClose(change["learning_rate_after"], reference_lr(80, 160, 5), rtol=1e-5)

    def test_a_length_that_leaves_the_step_decay_as_it_was_is_not_a_change(self):
        # --lr_schedule=step decays at epochs 30, 60, 80, whatever the length.
        self.start(80, "--lr_schedule=step")
        self.checkpoint_at(80)
        lines, change, _ = self.start(160, "--lr_schedule=step", "--train_steps=160")
        self.assertEqual((lines, change), ([], None))
        recorded = read_run_config(self.model_dir)
        self.assertEqual((recorded["schedule_steps"], recorded["schedule_changes"]), (160, []))


if __name__ == "__main__":
    tf.test.main()
