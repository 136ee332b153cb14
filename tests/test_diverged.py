"""A run whose loss went non-finite is a result, "diverged", not a failure: main.py
records it (``diverged.json``), the sweep counts it as done and goes on, and the report
never chooses its setting (a too-large learning rate of a tuning sweep)."""

import contextlib
import io
import json
import os
import tempfile

import tensorflow as tf

from conadv.studies import experiments, runner
from tests.child_process import TINY_RESNET

#: A tiny vanilla run whose gradient is not finite within its four steps.
DIVERGING = [
    "--methods=vanilla",
    "--batch_sizes=16",
    "--seeds=0",
    "--base_batch_size=16",
    "--dataset=digits",
    *TINY_RESNET,
    "--image_size=8",
    "--eval_batch_size=64",
    "--optimizer=momentum",
    "--learning_rate=1e6",
    "--warmup_epochs=0",
    "--train_steps=4",
    "--steps_per_loop=1",
    "--precise_bn_batches=1",
]


def sweep(out, *flags):
    """``conadv-experiments sweep``, in this process: (its return, its output)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = experiments.main(["sweep", f"--out={out}", *flags])
    return result, printed.getvalue()


class StaleDivergenceTest(tf.test.TestCase):
    def test_a_checkpoint_after_the_last_good_one_makes_the_record_stale(self):
        """Catches: a diverged.json trusted after the run was resumed by hand (a later
        checkpoint, so it trained past the divergence): the sweep would call it diverged
        and never resume it; and a diverged directory of another run taken as this
        sweep's (its run.json identity is checked, as a finished run's is)."""
        from tests.test_tuning import tuned_run, write_diverged

        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        run = tuned_run("vanilla", 0, 1.0)
        directory = write_diverged(out, run)  # last good checkpoint: ckpt-2
        for step in (0, 2):
            open(os.path.join(directory, f"ckpt-{step}.index"), "w").close()
        self.assertIsNotNone(runner.divergence(out, run))
        open(os.path.join(directory, "ckpt-6.index"), "w").close()
        self.assertIsNone(runner.divergence(out, run))
        os.remove(os.path.join(directory, "ckpt-6.index"))
        with open(os.path.join(directory, "run.json"), "w") as f:
            json.dump({**run.record(), "identity": "another"}, f)
        with self.assertRaisesRegex(runner.RunFailedError, "records identity another"):
            runner.train_all(out, [run], [])


class DivergedRunInASweepTest(tf.test.TestCase):
    def test_a_diverged_run_is_done_and_not_started_again(self):
        """A real main.py run that diverges. Catches: the sweep failing on it
        (RunFailedError), and the same command starting it again (a sweep that retries
        a diverged run forever, or never finishes)."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        summaries, printed = sweep(out, *DIVERGING)
        [(name, result)] = summaries.items()
        directory = os.path.join(out, "runs", name)
        self.assertFalse(os.path.exists(os.path.join(directory, "summary.json")))
        with open(os.path.join(directory, "diverged.json")) as f:
            record = json.load(f)
        self.assertEqual(result, {**record, "diverged": True})
        self.assertRegex(record["message"], r"^non-finite \w+( \w+)? at step \d+; last good")
        self.assertNotIn("\n", record["message"])
        self.assertEqual(
            record["message"],
            f"non-finite {record['quantity']} at step "
            f"{record['step']}; last good checkpoint none (no checkpoint yet)",
        )
        self.assertIsNone(record["last_good_checkpoint_step"])
        self.assertIn(f"diverged {name} at step {record['step']}: {record['message']}", printed)
        self.assertIn("sweep finished: 1 runs (1 diverged)", printed)
        with open(os.path.join(directory, "console.log")) as f:
            log = f.read()
        self.assertIn(f"error: {record['message']}", log)  # main.py's console line

        again, printed = sweep(out, *DIVERGING)
        self.assertEqual(again, summaries)
        self.assertIn("1 diverged run(s) skipped", printed)
        self.assertNotIn(f"started {name}", printed)
        self.assertNotIn(f"resumed {name}", printed)
        with open(os.path.join(directory, "console.log")) as f:
            self.assertEqual(f.read(), log)  # not started again


FAKE_MAIN = """import os, sys
model_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--model_dir="))
if {write!r}:
    with open(os.path.join(model_dir, "diverged.json"), "w") as f:
        f.write('{{"message": "non-finite clean loss at step 1", "step": 1}}')
print("error: {message}", flush=True)
sys.exit({status})
"""


class OtherFailuresStillFailTest(tf.test.TestCase):
    def run_fake(self, status, write, message):
        """``train_all`` of one run whose main.py is a stand-in exiting with ``status``."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        program = os.path.join(out, "fake_main.py")
        with open(program, "w") as f:
            f.write(FAKE_MAIN.format(write=write, message=message, status=status))
        _, fv, main_fv, main_args = experiments.parse(["sweep", f"--out={out}", *DIVERGING])
        [run] = experiments.plan(fv, main_fv, main_args)
        original = runner.MAIN
        runner.MAIN = program
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return runner.train_all(out, [run], main_args)
        finally:
            runner.MAIN = original

    def test_status_3_without_diverged_json_or_another_failure_stops_the_sweep(self):
        """Catches: every exit status 3 (or any failure) taken for a divergence."""
        for status, write in ((3, False), (2, False), (1, True), (0, False)):
            with self.assertRaisesRegex(runner.RunFailedError, "failed: error: boom"):
                self.run_fake(status, write, "boom")
        # The stand-in that does record its divergence: done.
        [result] = self.run_fake(3, True, "non-finite clean loss at step 1").values()
        self.assertEqual(result["step"], 1)
        self.assertTrue(result["diverged"])


if __name__ == "__main__":
    tf.test.main()
