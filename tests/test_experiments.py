"""Studies: the report's arithmetic against known summaries, its plots, and a real
sweep that is killed, restarted, and recorded for TensorBoard's HParams dashboard."""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from conadv.studies import experiments, grid, statistics
from tests.child_process import ROOT, TINY_RESNET, run_main

# Student's t, 0.975 quantile, 2 and 3 degrees of freedom (published tables).
T975 = {2: 4.302652729911275, 3: 3.182446305284263}


def plain_mean(xs):
    return sum(xs) / len(xs)


def plain_std(xs):
    m = plain_mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def write_run(out, run, summary):
    directory = os.path.join(out, "runs", run.name)
    os.makedirs(directory)
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump(run.record(), f)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f)
    return directory


def make_run(method, batch, seed, eps=None):
    return grid.Run(method, batch, seed, eps, None, 0.1, 1.0)


class StatisticsTest(tf.test.TestCase):
    def test_t_quantiles_match_published_tables(self):
        """Catches: a normal quantile (1.96) instead of Student's t, or the wrong dof."""
        for dof, expected in T975.items():
            self.assertAllClose(statistics.t_quantile(0.975, dof), expected, atol=1e-7)


class ReportArithmeticTest(tf.test.TestCase):
    """Known summaries in, every cell checked against plain arithmetic written here."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.out = tempfile.mkdtemp()
        cls.values = {}  # (method, batch, eps, seed) -> (test, train, images/s, robust)
        for b_index, batch in enumerate((64, 256)):
            for seed in (0, 1, 2):
                for method, eps_values in (
                    ("vanilla", [None]),
                    ("disadv", [4.0]),
                    ("conadv", [2.0, 4.0]),
                ):
                    for e_index, eps in enumerate(eps_values):
                        m_index = ("vanilla", "disadv", "conadv").index(method)
                        # Distinct, irregular numbers: no two cells alike.
                        test = 0.80 + 0.031 * m_index - 0.05 * b_index + 0.007 * seed**2
                        test += 0.013 * e_index * (1 if batch == 64 else -1)
                        # Seed × method interaction: per-seed differences vary, so a
                        # wrong interval width shows.
                        test += 0.005 * ((seed * (m_index + 2) + b_index) % 3)
                        train = test + 0.02 + 0.01 * b_index + 0.003 * seed
                        speed = 100.0 * (1 + m_index) + 10 * seed + batch / 64
                        robust = 0.3 + 0.01 * seed if method == "conadv" else None
                        cls.values[(method, batch, eps, seed)] = (test, train, speed, robust)
                        write_run(
                            cls.out,
                            make_run(method, batch, seed, eps),
                            {
                                "eval_top1": test,
                                "train_top1": train,
                                "images_per_second": speed,
                                "eval_robust_top1": robust,
                                "eval_top1_moving_average": test - 0.01,
                                "train_steps": 10,
                                "epochs": 2.0,
                                "wall_time_s": 5.0,
                            },
                        )
        # An unfinished run (no summary.json) is left out of everything.
        os.makedirs(os.path.join(cls.out, "runs", "vanilla_b1024_seed0"))
        [cls.report] = experiments.write_report(cls.out)

    def seeds_of(self, method, batch, eps, index):
        return [self.values[(method, batch, eps, s)][index] for s in (0, 1, 2)]

    def best_eps(self, method, batch):
        candidates = {"vanilla": [None], "disadv": [4.0], "conadv": [2.0, 4.0]}[method]
        return max(candidates, key=lambda e: plain_mean(self.seeds_of(method, batch, e, 0)))

    def test_csv_has_every_finished_run_and_its_numbers(self):
        import csv

        with open(os.path.join(self.out, "results.csv")) as f:
            rows = list(csv.DictReader(f))
        self.assertLen(rows, 2 * 3 * 4)
        for row in rows:
            eps = float(row["attack_eps"]) if row["attack_eps"] else None
            test, train, speed, _ = self.values[
                (row["method"], int(row["batch_size"]), eps, int(row["seed"]))
            ]
            self.assertAllClose(float(row["eval_top1"]), test, atol=1e-12)
            # Catches: the gap as test − train.
            self.assertAllClose(float(row["generalization_gap"]), train - test, atol=1e-12)

    def test_top1_cells_are_mean_std_and_n_of_the_best_eps(self):
        """Catches: the population std (n), the last ε instead of the best, a mean over ε."""
        self.assertEqual(self.best_eps("conadv", 64), 4.0)  # the data makes them differ
        self.assertEqual(self.best_eps("conadv", 256), 2.0)
        for method in ("vanilla", "disadv", "conadv"):
            for batch in (64, 256):
                eps = self.best_eps(method, batch)
                xs = self.seeds_of(method, batch, eps, 0)
                text = f"{plain_mean(xs):.4f} ± {plain_std(xs):.4f} (n=3"
                if eps is not None:
                    text += f", ε={eps:g}"
                self.assertIn(text + ")", self.report.markdown, (method, batch))
                cell = self.report.top1[(method, batch)]
                self.assertAllClose(cell.mean, plain_mean(xs), atol=1e-12)
                self.assertAllClose(cell.std, plain_std(xs), atol=1e-12)

    def test_paired_differences_and_intervals(self):
        """Catches: unpaired (difference of means with pooled spread), n instead of n − 1,
        or a normal quantile."""
        for batch in (64, 256):
            conadv = self.seeds_of("conadv", batch, self.best_eps("conadv", batch), 0)
            for other in ("vanilla", "disadv"):
                base = self.seeds_of(other, batch, self.best_eps(other, batch), 0)
                d = [a - b for a, b in zip(conadv, base)]
                half = T975[2] * plain_std(d) / math.sqrt(3)
                got = self.report.differences[(batch, f"conadv - {other}")]
                self.assertAllClose(
                    [got.mean, got.low, got.high],
                    [plain_mean(d), plain_mean(d) - half, plain_mean(d) + half],
                    atol=1e-9,
                )
                expected = (
                    f"{plain_mean(d):+.4f} [{plain_mean(d) - half:+.4f}, "
                    f"{plain_mean(d) + half:+.4f}] (n=3)"
                )
                self.assertIn(expected, self.report.markdown)

    def test_gap_is_train_minus_test(self):
        for method in ("vanilla", "disadv", "conadv"):
            for batch in (64, 256):
                eps = self.best_eps(method, batch)
                gaps = [
                    tr - te
                    for te, tr in zip(
                        self.seeds_of(method, batch, eps, 0), self.seeds_of(method, batch, eps, 1)
                    )
                ]
                self.assertAllClose(self.report.gap[(method, batch)].mean, plain_mean(gaps))
                text = f"{plain_mean(gaps):.4f} ± {plain_std(gaps):.4f}"
                self.assertIn(text, self.report.markdown)

    def test_eps_table_throughput_ratios_and_robust(self):
        for batch in (64, 256):
            for eps in (2.0, 4.0):
                xs = self.seeds_of("conadv", batch, eps, 0)
                cell = self.report.eps_cells[("conadv", batch, (("ε", eps),))]
                self.assertAllClose(cell.mean, plain_mean(xs))
            speeds = {
                m: plain_mean(self.seeds_of(m, batch, self.best_eps(m, batch), 2))
                for m in ("vanilla", "disadv", "conadv")
            }
            self.assertAllClose(
                self.report.throughput_ratios[(batch, "conadv / disadv")],
                speeds["conadv"] / speeds["disadv"],
            )
            self.assertAllClose(
                self.report.throughput_ratios[(batch, "conadv / vanilla")],
                speeds["conadv"] / speeds["vanilla"],
            )
            robust = self.seeds_of("conadv", batch, self.best_eps("conadv", batch), 3)
            self.assertAllClose(self.report.robust[("conadv", batch)].mean, plain_mean(robust))
            self.assertNotIn(("vanilla", batch), self.report.robust)

    def test_plots_are_pngs_of_the_table_numbers(self):
        for name in self.report.figures:
            with Image.open(os.path.join(self.out, name)) as image:
                image.verify()
                self.assertEqual(image.format, "PNG")
        axes = self.report.figures["accuracy_vs_batch.png"].axes[0]
        self.assertEqual(axes.get_xscale(), "log")
        drawn = {c.get_label(): c for c in axes.containers}
        self.assertCountEqual(drawn, ["vanilla", "disadv", "conadv"])
        for method, container in drawn.items():
            line, _, (bars,) = container
            self.assertEqual(list(line.get_xdata()), [64, 256])
            for i, batch in enumerate((64, 256)):
                xs = self.seeds_of(method, batch, self.best_eps(method, batch), 0)
                self.assertAllClose(line.get_ydata()[i], plain_mean(xs))
                low, high = bars.get_segments()[i][:, 1]
                self.assertAllClose((high - low) / 2, plain_std(xs))
        gap_axes = self.report.figures["gap_vs_batch.png"].axes[0]
        for container in gap_axes.containers:
            line = container[0]
            method = container.get_label()
            for i, batch in enumerate((64, 256)):
                eps = self.best_eps(method, batch)
                gaps = [
                    tr - te
                    for te, tr in zip(
                        self.seeds_of(method, batch, eps, 0), self.seeds_of(method, batch, eps, 1)
                    )
                ]
                self.assertAllClose(line.get_ydata()[i], plain_mean(gaps))
        # One line per (method, batch): DisAdv's single ε is a point, ConAdv's two a line.
        eps_axes = self.report.figures["accuracy_vs_eps.png"].axes[0]
        names = {"DisAdv": ("disadv", [4.0]), "ConAdv": ("conadv", [2.0, 4.0])}
        drawn = {c.get_label(): c for c in eps_axes.containers}
        self.assertCountEqual(drawn, [f"{m}, batch {b}" for m in names for b in (64, 256)])
        for label, container in drawn.items():
            name, batch = label.split(", batch ")
            method, eps_values = names[name]
            line = container[0]
            self.assertEqual(list(line.get_xdata()), eps_values)
            for i, eps in enumerate(eps_values):
                xs = self.seeds_of(method, int(batch), eps, 0)
                self.assertAllClose(line.get_ydata()[i], plain_mean(xs))


class TrainingCurvesTest(tf.test.TestCase):
    def test_curves_are_seed_means_of_the_logged_scalars_per_epoch(self):
        """Catches: the last seed's curve instead of the mean, or steps as epochs."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        logged = {}
        for seed in (0, 1):
            directory = write_run(
                out,
                make_run("vanilla", 64, seed),
                {"eval_top1": 0.5, "train_top1": 0.6, "train_steps": 8, "epochs": 2.0},
            )
            for subdir, tag in (("train", "loss/clean"), ("eval", "top1/eval")):
                writer = tf.summary.create_file_writer(os.path.join(directory, subdir))
                with writer.as_default():
                    for step in (4, 8):
                        value = 0.1 * step + seed + (0.5 if subdir == "eval" else 0.0)
                        tf.summary.scalar(tag, value, step=step)
                        logged[(subdir, seed, step)] = value
                writer.close()
        [report] = experiments.write_report(out)
        loss = report.figures["training_curves.png"].axes[0].lines
        top1 = report.figures["training_curves.png"].axes[1].lines
        for lines, subdir in ((loss, "train"), (top1, "eval")):
            [line] = lines
            self.assertEqual(list(line.get_xdata()), [1.0, 2.0])  # 4 steps per epoch
            expected = [plain_mean([logged[(subdir, s, step)] for s in (0, 1)]) for step in (4, 8)]
            self.assertAllClose(line.get_ydata(), expected)


class SweepFlagsTest(tf.test.TestCase):
    def test_bad_input_ends_with_one_line_naming_it(self):
        out = self.get_temp_dir()
        for argv, expected in [
            (["sweeep", f"--out={out}"], "sweep, report"),
            (["sweep"], "--out"),
            (["sweep", f"--out={out}", "--methods=advprop"], "--methods"),
            (["sweep", f"--out={out}", "--batch_sizes=0"], "--batch_sizes"),
            (["sweep", f"--out={out}", "--batch_size=64"], "--batch_sizes"),
            (["sweep", f"--out={out}", "--seed=3"], "--seed"),
            (["sweep", f"--out={out}", "--no_such_flag=1"], "no_such_flag"),
            (["sweep", f"--out={out}", "--lr_scaling=cubic"], "lr_scaling"),
            (["report", f"--out={out}"], "no finished run"),
        ]:
            with self.assertRaises(SystemExit) as raised:
                experiments.main(argv)
            message = str(raised.exception.code)
            self.assertIn(expected, message, argv)
            self.assertNotIn("\n", message, argv)

    def test_scaling_rules(self):
        """Catches: sqrt and linear swapped, or the warmup left unscaled."""
        runs = grid.plan(
            ["vanilla"],
            [64, 1024],
            [0],
            [4.0],
            [1],
            ["separate"],
            lr_scaling="sqrt",
            base_batch_size=256,
            base_learning_rate=2.0,
            base_warmup_epochs=4.0,
        )
        self.assertAllClose([r.learning_rate for r in runs], [1.0, 4.0])
        self.assertAllClose([r.warmup_epochs for r in runs], [2.0, 8.0])
        linear = grid.plan(
            ["vanilla"],
            [1024],
            [0],
            [4.0],
            [1],
            ["separate"],
            lr_scaling="linear",
            base_batch_size=256,
            base_learning_rate=2.0,
            base_warmup_epochs=4.0,
        )
        self.assertAllClose([linear[0].learning_rate, linear[0].warmup_epochs], [8.0, 16.0])


def hparams_sessions(out):
    """run name -> (hyperparameters, final eval top-1), read with TensorBoard's own
    event-file loader (as its HParams plugin reads them)."""
    sessions = {}
    for path in glob.glob(os.path.join(out, "runs", "*", "hparams", "events.out.tfevents.*")):
        params, top1 = None, None
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    if data.HasField("session_start_info"):
                        info = data.session_start_info
                        params = {
                            k: v.string_value or v.number_value for k, v in info.hparams.items()
                        }
                if value.tag == "final/eval_top1":
                    top1 = float(tensor_util.make_ndarray(value.tensor))
        sessions.setdefault(path.split(os.sep)[-3], []).append((params, top1))
    return sessions


def kill_runs_of(out):
    """SIGKILL to every process whose command line names ``out`` (the sweep's runs)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
            if out in command and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            continue


class SweepKilledAndResumedTest(tf.test.TestCase):
    """2 batch sizes × 2 methods of tiny main.py runs (seed 7, so a seed that is not
    passed on shows), killed with SIGKILL after the first run finished and while the
    second had a checkpoint, then restarted."""

    def test_sweep_skips_finished_and_resumes_interrupted_runs(self):
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        argv = [
            sys.executable,
            "-m",
            "conadv.studies.experiments",
            "sweep",
            f"--out={out}",
            "--methods=vanilla,conadv",
            "--batch_sizes=16,32",
            "--seeds=7",
            "--base_batch_size=16",
            *TINY_RESNET,
            "--image_size=16",
            "--eval_batch_size=64",
            "--train_steps=12",
            "--steps_per_loop=2",
            "--checkpoint_steps=2",
            "--epochs_between_evals=1000",
            "--precise_bn_batches=1",
            "--learning_rate=0.5",
            "--warmup_epochs=0",
        ]
        # Each run's directory ends in the hash of its whole configuration.
        _, fv, main_fv, main_args = experiments.parse(argv[3:])
        run_names = {
            run.name.rsplit("_", 1)[0]: run.name for run in experiments.plan(fv, main_fv, main_args)
        }
        first, second = (
            os.path.join(out, "runs", run_names[key])
            for key in ("vanilla_b16_seed7", "conadv_b16_eps4_tau1_seed7")
        )
        log_path = os.path.join(out, "sweep.log")
        os.makedirs(out, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                # A complete checkpoint: the state file names it once it is whole (an
                # index file alone may belong to a save still being written).
                if os.path.exists(
                    os.path.join(first, "summary.json")
                ) and tf.train.latest_checkpoint(second):
                    break
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep
            kill_runs_of(out)  # and its main.py, in a session of its own
        finally:
            proc.wait()
        with open(log_path) as f:
            self.assertEqual(proc.returncode, -signal.SIGKILL, f.read()[-3000:])
        self.assertFalse(os.path.exists(os.path.join(second, "summary.json")))
        first_finished = os.path.getmtime(os.path.join(first, "summary.json"))

        restarted = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(restarted.returncode, 0, restarted.stderr[-3000:])
        self.assertIn("1 finished run(s) skipped", restarted.stdout)
        self.assertIn(f"resumed {run_names['conadv_b16_eps4_tau1_seed7']}", restarted.stdout)
        self.assertRegex(restarted.stdout, r"ETA \d+:\d\d:\d\d")

        # The finished run was not trained again.
        self.assertEqual(os.path.getmtime(os.path.join(first, "summary.json")), first_finished)
        with open(os.path.join(first, "console.log")) as f:
            self.assertEqual(f.read().count("\n+ "), 0)  # one start, at the top
        # The interrupted one resumed from its checkpoint, not from step 0.
        with open(os.path.join(second, "console.log")) as f:
            starts = f.read().split("\n+ ")
        self.assertLen(starts, 2)
        resumed = re.search(r"Restored \S+ at step (\d+)", starts[1])
        self.assertIsNotNone(resumed, starts[1][-2000:])
        self.assertGreaterEqual(int(resumed.group(1)), 2)

        names = sorted(os.listdir(os.path.join(out, "runs")))
        self.assertLen(names, 4)
        sessions = hparams_sessions(out)
        self.assertCountEqual(sessions, names)
        for name in names:
            with open(os.path.join(out, "runs", name, "summary.json")) as f:
                summary = json.load(f)
            self.assertEqual(summary["train_steps"], 12)
            [(params, top1)] = sessions[name]  # one session per run, even across restarts
            method, batch, seed = re.fullmatch(
                r"(\w+?)_b(\d+)(?:_eps4_tau1)?_seed(\d)_[0-9a-f]{8}", name
            ).groups()
            self.assertEqual(params["method"], method)
            self.assertEqual(params["batch_size"], int(batch))
            self.assertEqual(params["seed"], int(seed))
            # Linear scaling from 0.5 at batch 16.
            self.assertAllClose(params["learning_rate"], 0.5 * int(batch) / 16)
            self.assertAllClose(top1, summary["eval_top1"])
        with open(
            os.path.join(out, "runs", run_names["conadv_b32_eps4_tau1_seed7"], "run_config.json")
        ) as f:
            flags = json.load(f)["flags"]
        self.assertEqual((flags["batch_size"], flags["learning_rate"]), (32, 1.0))


def summary_of(top1, train):
    return {"eval_top1": top1, "train_top1": train, "train_steps": 10, "epochs": 2.0}


class ConfigurationTest(tf.test.TestCase):
    """A sweep's run is its whole configuration.

    Catches: a run reused after a changed --lr_scaling or main.py flag (its directory
    named by the grid point alone), and a report that pools the runs of two
    configurations in one cell."""

    def plan_of(self, out, *extra):
        _, fv, main_fv, main_args = experiments.parse(
            [
                "sweep",
                f"--out={out}",
                "--methods=vanilla,conadv",
                "--batch_sizes=16,64",
                "--seeds=0,1",
                "--base_batch_size=16",
                "--dataset=digits",
                *extra,
            ]
        )
        return experiments.plan(fv, main_fv, main_args)

    def test_another_configuration_trains_runs_of_its_own_and_is_reported_apart(self):
        from conadv.studies import runner

        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        linear = self.plan_of(out)
        for index, run in enumerate(linear):
            write_run(out, run, summary_of(0.5 + 0.01 * index, 0.9))
        again = self.plan_of(out)
        self.assertEqual([r.name for r in again], [r.name for r in linear])
        self.assertTrue(all(runner.is_finished(out, run) for run in again))  # skipped
        for extra in (["--lr_scaling=sqrt"], ["--label_smoothing=0.2"], ["--train_epochs=8"]):
            other = self.plan_of(out, *extra)
            self.assertFalse(any(runner.is_finished(out, run) for run in other), extra)
            self.assertEqual(
                experiments.other_configurations(out, other), sorted(r.name for r in linear)
            )
        # A smaller grid of the same configuration: the other batch's runs are not "other".
        self.assertEqual(experiments.other_configurations(out, self.plan_of(out, "--seeds=0")), [])
        sqrt = self.plan_of(out, "--lr_scaling=sqrt")
        for index, run in enumerate(sqrt):
            write_run(out, run, summary_of(0.2 + 0.01 * index, 0.9))
        reports = experiments.write_report(out)
        self.assertEqual([r.title for r in reports], ["lr_scaling=linear", "lr_scaling=sqrt"])
        for report, runs, base in zip(reports, (linear, sqrt), (0.5, 0.2)):
            self.assertIn(f"# Sweep report: {report.title}", report.markdown)
            for method in ("vanilla", "conadv"):
                for batch in (16, 64):
                    want = [
                        base + 0.01 * i
                        for i, r in enumerate(runs)
                        if (r.method, r.batch_size) == (method, batch)
                    ]
                    cell = report.top1[(method, batch)]
                    self.assertEqual(cell.n, 2)
                    self.assertAllClose(cell.mean, plain_mean(want))

    def test_swept_eps_staleness_and_source_keep_every_method_in_one_report(self):
        """Catches: an axis the sweep varies taken as configuration for the methods it
        does not apply to (vanilla has no ε or source, DisAdv no τ), which splits the
        report into one table per method and loses every comparison between them."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        runs = self.plan_of(
            out,
            "--methods=vanilla,disadv,conadv",
            "--attack_eps=2,4",
            "--staleness=1,2",
            "--attack_source=separate,clean_pass",
        )
        self.assertEqual({r.method for r in runs}, {"vanilla", "disadv", "conadv"})
        for index, run in enumerate(runs):
            write_run(out, run, summary_of(0.5 + 0.001 * index, 0.9))
        reports = experiments.write_report(out)
        self.assertEqual([r.title for r in reports], [""])
        self.assertEqual({m for m, _ in reports[0].top1}, {"vanilla", "disadv", "conadv"})
        # A sweep that adds a τ axis over runs an earlier sweep trained: its τ = 1 runs
        # and DisAdv's (no τ) are the earlier ones, skipped; all stand in one report.
        from conadv.studies import runner

        again = tempfile.mkdtemp(dir=self.get_temp_dir())
        earlier = self.plan_of(again, "--methods=disadv,conadv")
        for run in earlier:
            write_run(again, run, summary_of(0.6, 0.9))
        swept = self.plan_of(again, "--methods=disadv,conadv", "--staleness=1,2")
        new = [run for run in swept if not runner.is_finished(again, run)]
        self.assertCountEqual([(r.method, r.staleness) for r in new], [("conadv", 2)] * 4)
        for run in new:
            write_run(again, run, summary_of(0.7, 0.9))
        records = {
            name: open(os.path.join(again, "runs", name, "run.json")).read()
            for name in os.listdir(os.path.join(again, "runs"))
        }
        runner.train_all(again, swept, [])  # every run finished: none trained
        for name, text in records.items():  # and no record rewritten
            with open(os.path.join(again, "runs", name, "run.json")) as f:
                self.assertEqual(f.read(), text, name)
        [report] = experiments.write_report(again)
        self.assertEqual(report.title, "")
        self.assertEqual(
            report.top1[("conadv", 16)].setting, (("ε", 4.0), ("τ", 2), ("source", "separate"))
        )
        # A τ the sweep does not vary is still ConAdv's grid point (and vanilla has none):
        # the run is named and recorded alike by every sweep that contains it.
        unswept = self.plan_of(out)
        self.assertEqual(
            {(r.method, r.staleness) for r in unswept}, {("vanilla", None), ("conadv", 1)}
        )
        self.assertFalse(any("staleness" in dict(r.config) for r in unswept))


class SharpnessSettingsTest(tf.test.TestCase):
    def test_a_run_measured_with_other_settings_is_measured_again(self):
        """Catches: a sweep that counts any ``sharpness.json`` as done, so its
        ``--sharpness_*`` flags are silently ignored for runs measured before."""
        from conadv.studies import runner
        from flags import sharpness as sharpness_flags

        _, _, main_fv, _ = experiments.parse(["sweep", "--out=/tmp/x", "--sharpness_eps=0.01"])
        settings = sharpness_flags.settings(main_fv)
        self.assertEqual(settings["sharpness_eps"], 0.01)
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        run = make_run("conadv", 16, 0)
        directory = write_run(out, run, summary_of(0.5, 0.9))
        self.assertTrue(runner.is_finished(out, run))
        self.assertFalse(runner.is_finished(out, run, settings))  # not measured yet
        # A measurement with other settings (another file, or the latest sharpness.json
        # of other settings) does not count; one with these settings does.
        other = {**settings, "sharpness_eps": 1e-3}
        os.makedirs(os.path.join(directory, sharpness_flags.MEASUREMENTS_DIR))
        for recorded, measured in ((other, False), (settings, True)):
            for name in (sharpness_flags.measurement_name(recorded), "sharpness.json"):
                with open(os.path.join(directory, name), "w") as f:
                    json.dump({"top_eigenvalue": 1.0, "settings": recorded}, f)
            self.assertEqual(runner.is_finished(out, run, settings), measured)
        self.assertNotEqual(
            sharpness_flags.measurement_name(other), sharpness_flags.measurement_name(settings)
        )


class SweepChecksTest(tf.test.TestCase):
    def test_a_warmup_as_long_as_the_run_is_a_one_line_error(self):
        """Linear scaling from batch 256 to 4096 makes main.py's 2 warmup epochs 32, of a
        run of 16 epochs: refused in the sweep and in main.py's dry run."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        _, fv, main_fv, main_args = experiments.parse(
            [
                "sweep",
                f"--out={out}",
                "--methods=vanilla",
                "--batch_sizes=256,4096",
                "--seeds=0",
                "--dataset=synthetic",
                "--dry_run",
            ]
        )
        with self.assertRaisesRegex(Exception, "--warmup_epochs=32 is") as caught:
            experiments.sweep(fv, main_fv, main_args)
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("vanilla_b4096_seed0", str(caught.exception))
        proc = run_main(
            "--mode=dry_run",
            "--dataset=synthetic",
            "--warmup_epochs=16",
            "--train_epochs=16",
            expect_ok=False,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn("error: --warmup_epochs=16 is", proc.stderr)

    def test_eta_counts_parallel_runs_once(self):
        """4 runs of 100 s left at --parallel 2 take 200 s (they finish two at a time), at
        --parallel 1 400 s. Catches the ETA divided by --parallel a second time."""
        import datetime
        import io

        from conadv.studies import runner

        for parallel in (1, 2):
            now = [0.0]
            progress = runner.Progress(6, 0, parallel, io.StringIO(), clock=lambda now=now: now[0])
            self.assertEqual(progress.eta(), "unknown")
            now[0] = 100.0
            for _ in range(parallel):  # the first runs, finished together
                progress.finished("run", 100.0, {})
            left = 6 - parallel
            want = datetime.timedelta(seconds=round(left * 100.0 / parallel))
            self.assertEqual(progress.eta(), str(want))
            if parallel == 2:
                self.assertEqual(progress.eta(), "0:03:20")


class SourceDifferencesTest(tf.test.TestCase):
    """``report.source_differences``: clean_pass − separate, paired by seed. Catches the
    difference inverted and seeds paired wrongly (the interval of unpaired values)."""

    def test_pairs_clean_pass_with_separate_of_the_same_seed(self):
        from conadv.studies import report as report_lib

        rows = []
        for seed, (separate, free) in enumerate([(0.90, 0.93), (0.80, 0.82), (0.85, 0.86)]):
            for source, top1 in (("separate", separate), ("clean_pass", free)):
                rows.append(
                    dict(
                        method="conadv",
                        batch_size=64,
                        seed=seed,
                        attack_source=source,
                        eval_top1=top1,
                    )
                )
        [(key, (separate, free, difference))] = report_lib.source_differences(rows).items()
        self.assertEqual(key, ("conadv", 64, ()))
        self.assertAllClose(separate.mean, 0.85)
        self.assertAllClose(free.mean, 0.87)
        self.assertAllClose(difference.mean, 0.02)
        # Differences 0.03, 0.02, 0.01: std 0.01, half-width t(0.975, 2)·0.01/√3.
        self.assertAllClose(difference.high - difference.mean, 4.302653 * 0.01 / 3**0.5, rtol=1e-4)


class RunIdentityTest(tf.test.TestCase):
    """What a sweep's run identity covers. Catches: a flag that changes a run's numbers
    left out of it (each of the flags below, one at a time), and flags a method does not
    use kept in it (a vanilla run trained again for another --attack_eps)."""

    def names(self, *extra, methods="vanilla,conadv"):
        _, fv, main_fv, main_args = experiments.parse(
            [
                "sweep",
                "--out=/nonexistent",
                f"--methods={methods}",
                "--batch_sizes=16",
                "--seeds=0",
                "--base_batch_size=16",
                "--dataset=digits",
                *extra,
            ]
        )
        return {run.method: run.name for run in experiments.plan(fv, main_fv, main_args)}

    def test_every_flag_that_changes_the_numbers_changes_the_identity(self):
        base = self.names()
        for extra in (
            ["--train_steps=7"],
            ["--train_epochs=3"],
            ["--precise_bn_batches=3"],
            ["--eval_attack_eps=2"],
            ["--eval_attack_steps=3"],
            ["--eval_attack_step_size=0.5"],
            ["--learning_rate=0.3"],
            ["--warmup_epochs=0.5"],
            ["--label_smoothing=0"],
            ["--train_examples=100"],
            ["--distribution_strategy=mirrored", "--num_cpu_devices=2"],
            ["--num_replicas=2"],
            ["--lr_scaling=sqrt"],
        ):
            other = self.names(*extra)
            for method in ("vanilla", "conadv"):
                self.assertNotEqual(other[method], base[method], (extra, method))

    def test_flags_a_method_does_not_use_leave_its_identity(self):
        base = self.names()
        for extra in (["--attack_eps=8"], ["--attack_init=zero"], ["--staleness=2"]):
            other = self.names(*extra)
            self.assertEqual(other["vanilla"], base["vanilla"], extra)
            self.assertNotEqual(other["conadv"], base["conadv"], extra)
        disadv = self.names(methods="disadv")["disadv"]
        self.assertEqual(self.names("--staleness=2", methods="disadv")["disadv"], disadv)
        # The same identity whether a value is swept or given: one name for one run.
        self.assertEqual(self.names("--attack_eps=4")["conadv"], base["conadv"])
        self.assertEqual(self.names("--staleness=1")["conadv"], base["conadv"])

    def test_the_data_is_its_content_not_its_path(self):
        """Catches: the data left out of the identity (other images, same run), or its
        path put in (a moved copy trained again)."""
        import shutil

        from tests.folder_data import write_folder_dataset

        root = tempfile.mkdtemp(dir=self.get_temp_dir())
        a = write_folder_dataset(os.path.join(root, "a"), seed=1, size=20, shards=2)
        b = write_folder_dataset(os.path.join(root, "b"), seed=2, size=20, shards=2)
        moved = os.path.join(root, "elsewhere", "records")
        shutil.copytree(a, moved)

        def vanilla(data_dir):
            return self.names("--dataset=folder", f"--data_dir={data_dir}", methods="vanilla")

        self.assertEqual(vanilla(moved), vanilla(a))
        self.assertNotEqual(vanilla(b), vanilla(a))


def measure(directory, eigenvalue, eps_sharpness, settings):
    """A measurement as main.py --mode sharpness writes it: a file per setting."""
    from flags import sharpness as sharpness_flags

    path = os.path.join(directory, sharpness_flags.measurement_name(settings))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"top_eigenvalue": eigenvalue, "eps_sharpness": eps_sharpness, "settings": settings},
            f,
        )


def sharpness_run(out, method, seed, top1, eigenvalue, eps_sharpness, settings, batch=16):
    directory = write_run(out, make_run(method, batch, seed), summary_of(top1, top1 + 0.1))
    measure(directory, eigenvalue, eps_sharpness, settings)
    return directory


class PairingAndSharpnessSettingsTest(tf.test.TestCase):
    """Paired differences pair by seed, within one sharpness setting.

    Seeds 10, 2, 3 and 7 (directory order "seed10" < "seed2" < "seed3" < "seed7", not
    numeric), with seed 2 missing for vanilla, in the middle. Catches: pairing by
    insertion order (10–10, then 2–3), measurements of different ``--sharpness_*``
    settings put in one cell or one paired difference (or the settings left unnamed),
    and a run's earlier measurement lost to a later one of other settings."""

    def test_pairs_by_seed_within_one_setting(self):
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        wide = {"sharpness_examples": 1024, "sharpness_eps": 0.001}
        narrow = {"sharpness_examples": 64, "sharpness_eps": 0.001}
        values = {  # (method, seed) -> (top-1, eigenvalue, ε-sharpness, settings)
            ("conadv", 10): (0.91, 40.0, 2.0, wide),
            ("conadv", 2): (0.85, 55.0, 3.5, wide),
            ("conadv", 3): (0.88, 61.0, 1.5, wide),
            ("conadv", 7): (0.80, 9.0, 0.5, narrow),
            ("vanilla", 10): (0.84, 100.0, 7.0, wide),
            ("vanilla", 3): (0.86, 70.0, 4.0, wide),
        }
        for (method, seed), (top1, eig, eps, settings) in values.items():
            directory = sharpness_run(out, method, seed, top1, eig, eps, settings)
            if (method, seed) == ("vanilla", 10):  # measured with both settings
                measure(directory, 33.0, 1.25, narrow)
        [report] = experiments.write_report(out)
        top1 = report.differences[(16, "conadv - vanilla")]
        self.assertEqual(top1.seeds, (3, 10))
        self.assertAllClose(top1.mean, plain_mean([0.91 - 0.84, 0.88 - 0.86]))

        groups = {g.settings["sharpness_examples"]: g for g in report.sharpness}
        self.assertCountEqual(groups, [1024, 64])
        wide_group, narrow_group = groups[1024], groups[64]
        self.assertEqual(
            wide_group.top_eigenvalue[("conadv", 16)].by_seed, {10: 40.0, 2: 55.0, 3: 61.0}
        )
        self.assertEqual(narrow_group.top_eigenvalue[("conadv", 16)].by_seed, {7: 9.0})
        # Both measurements of one run are kept, each in its own setting's cell.
        self.assertEqual(narrow_group.top_eigenvalue[("vanilla", 16)].by_seed, {10: 33.0})
        self.assertEqual(wide_group.top_eigenvalue[("vanilla", 16)].by_seed, {10: 100.0, 3: 70.0})
        for metric, index in (("top_eigenvalue", 1), ("eps_sharpness", 2)):
            d = wide_group.differences[(metric, 16, "conadv - vanilla")]
            self.assertEqual(d.seeds, (3, 10))
            want = [values[("conadv", s)][index] - values[("vanilla", s)][index] for s in (3, 10)]
            self.assertAllClose(d.mean, plain_mean(want))
            self.assertAllClose(d.high - d.mean, 12.7062047 * plain_std(want) / 2**0.5, rtol=1e-5)
            self.assertNotIn((metric, 16, "conadv - vanilla"), narrow_group.differences)
        self.assertIn("sharpness_examples=1024", report.markdown)
        self.assertIn("sharpness_examples=64", report.markdown)
        self.assertIn("ε-sharpness", report.markdown)


class OneRunPerCellTest(tf.test.TestCase):
    def test_two_runs_in_one_cell_stop_the_report_naming_both(self):
        """Catches: a cell that keeps one of two runs silently (the last one read)."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        first = write_run(out, make_run("conadv", 16, 0), summary_of(0.5, 0.9))
        twin = dataclasses_replace(make_run("conadv", 16, 0), identity="0123abcd")
        second = write_run(out, twin, summary_of(0.7, 0.9))
        with self.assertRaises(SystemExit) as raised:
            experiments.main(["report", f"--out={out}"])
        message = str(raised.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn(first, message)
        self.assertIn(second, message)


def dataclasses_replace(run, **changes):
    import dataclasses

    return dataclasses.replace(run, **changes)


class EpsPlotTest(tf.test.TestCase):
    def test_one_line_per_method_source_and_tau(self):
        """Catches: runs of both sources (or two τ) drawn as one zig-zag line over ε."""
        from conadv.studies import figures

        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        expected = {}
        for method, taus in (("disadv", [None]), ("conadv", [1, 2])):
            for tau in taus:
                for source in ("separate", "clean_pass"):
                    for eps in (4.0, 2.0):
                        top1 = 0.5 + 0.01 * eps + (0.1 if source == "clean_pass" else 0)
                        top1 += 0.001 * (tau or 0)
                        run = grid.Run(method, 16, 0, eps, tau, 0.1, 1.0, attack_source=source)
                        write_run(out, run, summary_of(top1, 0.9))
                        label = ", ".join(
                            [{"disadv": "DisAdv", "conadv": "ConAdv"}[method], "batch 16"]
                            + ([f"τ={tau}"] if tau else [])
                            + [source]
                        )
                        expected.setdefault(label, {})[eps] = top1
        [report] = experiments.write_report(out)
        series = figures.eps_series(report)
        self.assertCountEqual(series, expected)
        for label, (xs, ys, _) in series.items():
            self.assertEqual(xs, [2.0, 4.0])
            self.assertAllClose(ys, [expected[label][2.0], expected[label][4.0]])


class OlderRecordsTest(tf.test.TestCase):
    """Runs recorded by an older version (no data fingerprint or replica count) beside
    this version's. Catches: an empty or older configuration taken as part of every
    section, which mixes runs of other data or devices into its cells."""

    def test_only_missing_attack_flags_make_a_configuration_part_of_another(self):
        from conadv.studies import sections

        base = {"dataset": "folder", "data_fingerprint": "a", "replicas": 1}
        attack = {**base, "attack_init": "zero", "attack_steps": 1}
        self.assertTrue(sections.part_of(base, attack))  # vanilla's in an attack's
        self.assertFalse(sections.part_of({}, base))
        self.assertFalse(sections.part_of({"dataset": "folder"}, base))
        self.assertFalse(sections.part_of({**base, "replicas": 2}, attack))

    def test_an_older_record_beside_new_ones_is_refused_in_one_line(self):
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        [new] = ConfigurationTest.plan_of(self, out, "--methods=vanilla", "--batch_sizes=16")[:1]
        write_run(out, new, summary_of(0.5, 0.9))
        old = write_run(out, make_run("conadv", 16, 0), summary_of(0.6, 0.9))
        with self.assertRaises(SystemExit) as raised:
            experiments.main(["report", f"--out={out}"])
        message = str(raised.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn(old, message)
        self.assertIn("older version", message)
