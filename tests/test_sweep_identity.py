"""A study is only ever its own runs: real sweeps of tiny ``main.py`` runs stacked in one
``--out``, as a study grows — other data, another replica count, other attack flags
under a swept source, other sharpness settings, and ε / plain / ε sweeps — each trains
or measures anew, or lands in a section of its own, and never reuses another run."""

import json
import os
import shutil
import tempfile

import tensorflow as tf

from conadv.studies import experiments
from tests import folder_data
from tests.child_process import TINY_RESNET, run_main


def write_images(root: str, seed: int) -> str:
    """24 training and 6 validation PNGs of 3 classes, 20 px, in 2 shards."""
    return folder_data.write_folder_dataset(root, seed=seed, size=20, shards=2)


#: main.py flags of every run: one step of ResNet-8 ×0.25 on 16 px images.
RUN_FLAGS = [
    *TINY_RESNET,
    "--dataset=folder",
    "--image_size=16",
    "--train_steps=1",
    "--steps_per_loop=1",
    "--epochs_between_evals=1000",
    "--precise_bn_batches=1",
    "--eval_batch_size=32",
    "--learning_rate=0.1",
    "--warmup_epochs=0",
]


def sweep_lines(out: str, data_dir: str, *extra: str) -> tuple[list[str], list[str]]:
    """Runs ``experiments sweep`` in-process (its runs are main.py processes); returns
    (runs started, progress lines)."""
    import contextlib
    import io

    argv = [
        "sweep",
        f"--out={out}",
        "--batch_sizes=8",
        "--base_batch_size=8",
        "--seeds=0",
        *extra,
        *RUN_FLAGS,
        f"--data_dir={data_dir}",
    ]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        experiments.main(argv)
    lines = buffer.getvalue().splitlines()
    started = [line.split("| started ")[1] for line in lines if "| started " in line]
    return started, lines


def report_of(out: str) -> dict:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return {r.title: r for r in experiments.write_report(out)}


def summary_top1(out: str, name: str) -> float:
    with open(os.path.join(out, "runs", name, "summary.json")) as f:
        return json.load(f)["eval_top1"]


class StackedSweepsTest(tf.test.TestCase):
    """One ``--out``, one sweep after another (7 runs trained in all)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        cls.data_a = write_images(os.path.join(cls.root, "a"), seed=1)
        cls.data_b = write_images(os.path.join(cls.root, "b"), seed=2)
        # The same shards under another path (a moved folder, another bucket).
        cls.data_a_moved = os.path.join(cls.root, "moved", "records")
        shutil.copytree(cls.data_a, cls.data_a_moved)
        cls.out = os.path.join(cls.root, "study")

    def test_stacked_sweeps_each_train_their_own_runs(self):
        out = self.out
        eps_sweep = ("--methods=vanilla,disadv", "--attack_eps=2,4")

        # ε, plain, ε: the plain sweep's runs are the ε sweep's ε = 4 runs (same names),
        # and no sweep rewrites a record. Catches: names that depend on what was swept.
        started, _ = sweep_lines(out, self.data_a, *eps_sweep)
        self.assertLen(started, 3)
        records = {
            name: open(os.path.join(out, "runs", name, "run.json")).read()
            for name in os.listdir(os.path.join(out, "runs"))
        }
        self.assertEqual(sweep_lines(out, self.data_a, "--methods=vanilla,disadv")[0], [])
        self.assertEqual(sweep_lines(out, self.data_a, *eps_sweep)[0], [])
        for name, text in records.items():
            with open(os.path.join(out, "runs", name, "run.json")) as f:
                self.assertEqual(f.read(), text)
        overlapping = report_of(out)
        self.assertEqual(list(overlapping), [""])  # one section, with its vanilla baseline
        [report] = overlapping.values()
        self.assertIn(("vanilla", 8), report.top1)
        self.assertIsNotNone(report.gap[("vanilla", 8)])
        # The union swept at once (the same runs, recorded by one sweep) reports the same.
        union = os.path.join(self.root, "union")
        for name in records:
            shutil.copytree(
                os.path.join(out, "runs", name),
                os.path.join(union, "runs", name),
                ignore=shutil.ignore_patterns("run.json", "hparams"),
            )
        self.assertEqual(sweep_lines(union, self.data_a, *eps_sweep)[0], [])
        self.assertEqual(report_of(union)[""].markdown, report.markdown)

        # A swept source, then other attack flags: only the new separate run is trained,
        # the clean_pass run (which fixes those flags) is shared, and each separate run
        # is paired with it in a section of its own. Catches: attack flags dropped from
        # the configuration of every run when the source is swept.
        source_sweep = ("--methods=disadv", "--attack_source=separate,clean_pass")
        started, _ = sweep_lines(out, self.data_a, *source_sweep)
        self.assertEqual(
            [name.split("_seed")[0] for name in started], ["disadv_b8_eps4_clean_pass"]
        )
        zero = ("--attack_init=zero", "--attack_bn=main")
        started, _ = sweep_lines(out, self.data_a, *source_sweep, *zero)
        self.assertEqual([name.split("_seed")[0] for name in started], ["disadv_b8_eps4"])
        zero_run = started[0]

        # Other data: trained anew; the same data moved: the same run, skipped.
        # Catches: --data_dir left out of the identity, or the path put in it.
        started, _ = sweep_lines(out, self.data_b, "--methods=vanilla")
        self.assertLen(started, 1)
        other_data_run = started[0]
        started, lines = sweep_lines(out, self.data_a_moved, "--methods=vanilla")
        self.assertEqual(started, [])
        self.assertTrue(any("1 finished run(s) skipped" in line for line in lines))

        # Another replica count: trained anew (BatchNorm over other examples).
        two = ("--distribution_strategy=mirrored", "--num_cpu_devices=2")
        started, _ = sweep_lines(out, self.data_a, "--methods=vanilla", *two)
        self.assertLen(started, 1)
        two_replica_run = started[0]
        with open(os.path.join(out, "runs", two_replica_run, "run_config.json")) as f:
            self.assertEqual(json.load(f)["flags"]["num_replicas"], 2)
        # Read on one device all the same: the sweep's --num_replicas is not a reading
        # mode's (catches it filled in from the record, which refuses one device).
        run_main(
            "--mode=eval",
            "--distribution_strategy=one_device",
            f"--model_dir={os.path.join(out, 'runs', two_replica_run)}",
        )

        sections = report_of(out)
        self.assertLen(sections, 4, list(sections))
        by_run = {}
        for title, section in sections.items():
            for row in section.rows:
                by_run.setdefault(os.path.basename(row["directory"]), []).append(title)
        # Runs of other data or replicas stand alone; the shared runs in both attacks'.
        self.assertLen(by_run[other_data_run], 1)
        self.assertLen(by_run[two_replica_run], 1)
        self.assertNotEqual(by_run[other_data_run], by_run[two_replica_run])
        self.assertIn("replicas=2", by_run[two_replica_run][0])
        self.assertIn(f"({self.data_b})", by_run[other_data_run][0])
        [zero_title] = by_run[zero_run]
        self.assertIn("attack_init=zero", zero_title)
        clean_pass = [name for name in by_run if "_clean_pass_" in name]
        self.assertLen(clean_pass, 1)
        self.assertLen(by_run[clean_pass[0]], 2)
        vanilla_a = [n for n, t in by_run.items() if n.startswith("vanilla") and len(t) == 2]
        self.assertLen(vanilla_a, 1)  # the baseline of both attacks
        # clean_pass − separate pairs the clean_pass run with each section's own.
        for title, section in sections.items():
            if "attack_init" not in title:
                continue
            [(key, (separate, free, difference))] = section.source_differences.items()
            self.assertEqual(key, ("disadv", 8, (("ε", 4.0),)))
            separate_runs = [
                row
                for row in section.rows
                if row["method"] == "disadv"
                and row["attack_source"] == "separate"
                and row["attack_eps"] == 4.0
            ]
            [separate_run] = separate_runs  # one run per cell
            self.assertEqual(separate.by_seed, {0: separate_run["eval_top1"]})
            self.assertEqual(free.by_seed, {0: summary_top1(out, clean_pass[0])})
            self.assertEqual(
                separate_run["directory"].endswith(zero_run), "attack_init=zero" in title
            )
            self.assertAllClose(difference.mean, free.mean - separate.mean)

        # Sharpness with other settings: measured again. Catches any sharpness.json
        # taken as done.
        vanilla_run = vanilla_a[0]
        path = os.path.join(out, "runs", vanilla_run, "sharpness.json")
        settings = []
        for examples in ("16", "8"):
            measure = (
                "--methods=vanilla",
                "--sharpness",
                f"--sharpness_examples={examples}",
                "--sharpness_iterations=2",
                "--sharpness_steps=1",
            )
            sweep_lines(out, self.data_a, *measure)
            with open(path) as f:
                settings.append(json.load(f)["settings"]["sharpness_examples"])
        self.assertEqual(settings, [16, 8])
        # The first measurement is kept beside the second (a file per setting).
        measured = os.listdir(os.path.join(out, "runs", vanilla_run, "sharpness"))
        self.assertLen(measured, 2)
        [section] = [s for t, s in report_of(out).items() if "attack_init=zero" in t]
        examples = sorted(g.settings["sharpness_examples"] for g in section.sharpness)
        self.assertEqual(examples, [8, 16])


class ResumeOnOtherDataTest(tf.test.TestCase):
    def test_resume_on_other_data_is_refused_and_a_moved_copy_accepted(self):
        """Catches: a resume that continues a run on other data silently, or a
        fingerprint of the path (which would refuse the moved copy)."""
        root = tempfile.mkdtemp(dir=self.get_temp_dir())
        data_a = write_images(os.path.join(root, "a"), seed=1)
        data_b = write_images(os.path.join(root, "b"), seed=2)
        moved = os.path.join(root, "moved")
        shutil.copytree(data_a, moved)
        model_dir = os.path.join(root, "run")
        common = [*RUN_FLAGS, "--method=vanilla", "--batch_size=8", f"--model_dir={model_dir}"]

        def main(*args):
            return run_main(*common, *args, expect_ok=False)

        first = main(f"--data_dir={data_a}", "--mode=train")
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        with open(os.path.join(model_dir, "run_config.json")) as f:
            recorded = json.load(f)["data_fingerprint"]
        self.assertRegex(recorded, r"^[0-9a-f]{12}$")
        refused = main(f"--data_dir={data_b}", "--train_steps=2", "--mode=train")
        self.assertEqual(refused.returncode, 2)
        [line] = refused.stderr.strip().splitlines()[-1:]
        self.assertIn("was trained on other data", line)
        self.assertIn(data_a, line)
        self.assertIn(data_b, line)
        self.assertEqual(os.path.basename(tf.train.latest_checkpoint(model_dir)), "ckpt-1")
        resumed = main(f"--data_dir={moved}", "--train_steps=2", "--mode=train")
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        self.assertNotIn("other data", resumed.stderr)
        self.assertEqual(os.path.basename(tf.train.latest_checkpoint(model_dir)), "ckpt-2")
