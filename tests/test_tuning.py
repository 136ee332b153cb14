"""Tuning the learning rate per method: the sweep's tuning axes (multiples of the scaled
learning rate and warmup) and the report that chooses each method's setting on held-out
training data (``selection_top1``), never on the test set, and never a setting that
diverged. Fake finished runs (run.json and summary.json) and diverged ones (run.json and
diverged.json), no training."""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import tempfile

import numpy as np
import tensorflow as tf

from conadv.studies import experiments, grid, sweep_flags
from flags.validation import FlagError
from tests.test_experiments import measure, write_run

#: Student's t, 0.975 quantile, 1 degree of freedom (published tables).
T975_1 = 12.706204736174698
HELD_OUT = 500
BATCH = 64
MULTIPLIERS = (0.5, 1.0, 2.0)

#: (method, multiplier) -> seed -> (selection top-1, test top-1). Seeds 10, 2, 3 for
#: vanilla and 10, 3, 7 for ConAdv: directory order ("seed10" < "seed2" < "seed3") is not
#: numeric, and each method has a seed the other lacks.
VALUES = {
    # Vanilla: ×1 has the best mean selection top-1, ×2 the best test top-1 at every
    # seed. Seeds 10 and 3 (the first and last read, the largest and the median) prefer
    # ×2 on selection and ×2 holds the single best selection number, seed 2 prefers ×1
    # by far: only the mean over seeds picks ×1.
    ("vanilla", 0.5): {10: (0.50, 0.40), 2: (0.52, 0.42), 3: (0.51, 0.41)},
    ("vanilla", 1.0): {10: (0.80, 0.62), 2: (0.78, 0.55), 3: (0.75, 0.68)},
    ("vanilla", 2.0): {10: (0.90, 0.75), 2: (0.40, 0.74), 3: (0.76, 0.79)},
    # ConAdv: ×2 best on selection, ×0.5 best on test; very different values per seed.
    ("conadv", 0.5): {10: (0.55, 0.90), 3: (0.56, 0.91), 7: (0.57, 0.92)},
    ("conadv", 1.0): {10: (0.60, 0.70), 3: (0.61, 0.52), 7: (0.62, 0.81)},
    ("conadv", 2.0): {10: (0.66, 0.83), 3: (0.64, 0.61), 7: (0.65, 0.77)},
}
CHOSEN = {"vanilla": 1.0, "conadv": 2.0}


def tuned_run(method, seed, m, batch=BATCH, base_lr=0.1):
    eps, tau = (4.0, 1) if method == "conadv" else (None, None)
    return grid.Run(method, batch, seed, eps, tau, base_lr * m, 1.0, lr_multiplier=m)


def summary(selection, test, with_selection=True):
    out = {"eval_top1": test, "train_top1": test + 0.1, "train_steps": 10, "epochs": 2.0}
    if with_selection:
        out.update(
            selection_top1=selection,
            selection_top5=min(1.0, selection + 0.1),
            selection_loss=1.0 - selection,
            selection_examples=HELD_OUT,
        )
    return out


SHARPNESS = {"sharpness_examples": 64, "sharpness_eps": 0.001}


def eigenvalue(method, m, seed):
    return 100.0 * m + seed + (0.5 if method == "conadv" else 0.0)


def write_study(out, with_selection=True, sharpness=False):
    for (method, m), by_seed in VALUES.items():
        for seed, (selection, test) in by_seed.items():
            run = tuned_run(method, seed, m)
            directory = write_run(out, run, summary(selection, test, with_selection))
            if sharpness:
                value = eigenvalue(method, m, seed)
                measure(directory, value, value / 100, SHARPNESS)


def quiet_report(out):
    with contextlib.redirect_stdout(io.StringIO()):
        return experiments.write_report(out)


def setting(method, m):
    """The report's setting of a run of VALUES: ε and τ for ConAdv, a multiplier ≠ 1."""
    items = [("ε", 4.0), ("τ", 1)] if method == "conadv" else []
    return tuple(items + ([("lr", m)] if m != 1 else []))


class TunedReportTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.out = tempfile.mkdtemp()
        write_study(cls.out, sharpness=True)
        [cls.report] = quiet_report(cls.out)

    def test_chooses_on_the_mean_selection_top1_and_reports_its_test_top1(self):
        """Catches: the choice made on test top-1 (vanilla ×2), on one seed's selection
        top-1 (seed 10 or 3, read first or last: ×2), on the best single run (×2) or by
        a vote of seeds (×2)."""
        for method, m in CHOSEN.items():
            self.assertEqual(self.report.best[(method, BATCH)], setting(method, m), method)
            test = {s: t for s, (_, t) in VALUES[(method, m)].items()}
            selection = {s: v for s, (v, _) in VALUES[(method, m)].items()}
            self.assertEqual(self.report.top1[(method, BATCH)].by_seed, test)
            self.assertEqual(self.report.tuning.selection[(method, BATCH)].by_seed, selection)
            self.assertEqual(self.report.tuning.chosen_on[(method, BATCH)], "selection")
            t = list(test.values())
            text = f"{np.mean(t):.4f} ± {np.std(t, ddof=1):.4f} (n=3"
            self.assertIn(text, self.report.markdown)
        # The test set's favourite is there, in the table of every setting, not chosen.
        best_on_test = max(
            MULTIPLIERS, key=lambda m: np.mean([t for _, t in VALUES[("vanilla", m)].values()])
        )
        self.assertEqual(best_on_test, 2.0)
        vanilla_x2 = self.report.tuning.every[("vanilla", BATCH, setting("vanilla", 2.0))]
        self.assertAllClose(vanilla_x2[1].mean, np.mean([0.75, 0.74, 0.79]))
        self.assertIn("not optimistic", self.report.markdown)

    def test_settings_are_compared_over_the_seeds_they_all_have(self):
        """Catches: each setting's mean over whatever seeds it has (a partial sweep): ×2's
        extra seed would lift it over ×1, which is better on the seeds both have."""
        from conadv.studies import tuning

        rows = []
        for m, values in ((1.0, {0: 0.88, 1: 0.88}), (2.0, {0: 0.85, 1: 0.85, 2: 1.0})):
            for seed, value in values.items():
                rows.append(
                    {
                        "method": "vanilla",
                        "batch_size": BATCH,
                        "seed": seed,
                        "lr_multiplier": m,
                        "selection_top1": value,
                        "eval_top1": value,
                    }
                )
        best, how = tuning.choose(rows)
        self.assertEqual(how[("vanilla", BATCH)], tuning.ON_SELECTION)
        self.assertEqual(best[("vanilla", BATCH)], ())  # ×1: no multiplier in the setting
        for row in rows:
            row["seed"] += 10 * (row["lr_multiplier"] == 2.0)  # no seed in common
        with self.assertRaisesRegex(Exception, "no seed has finished at every setting"):
            tuning.choose(rows)

    def test_ties_go_to_the_smaller_multiplier_and_no_number_never_wins(self):
        """Catches: settings ordered as text (×10 before ×2) for a tie; a NaN mean chosen
        because it came first (every comparison with NaN is false)."""
        from conadv.studies import tuning

        def rows(values):
            return [
                {
                    "method": "vanilla",
                    "batch_size": BATCH,
                    "seed": 0,
                    "lr_multiplier": m,
                    "selection_top1": v,
                    "eval_top1": v,
                }
                for m, v in values.items()
            ]

        best, _ = tuning.choose(rows({10.0: 0.9, 2.0: 0.9}))
        self.assertEqual(best[("vanilla", BATCH)], (("lr", 2.0),))
        best, _ = tuning.choose(rows({1.0: 0.9, 0.5: 0.9}))  # ×1 is left out of a setting
        self.assertEqual(best[("vanilla", BATCH)], (("lr", 0.5),))
        best, _ = tuning.choose(rows({0.5: float("nan"), 2.0: 0.8}))
        self.assertEqual(best[("vanilla", BATCH)], (("lr", 2.0),))

    def test_paired_differences_pair_seeds_at_each_methods_chosen_setting(self):
        """ConAdv − vanilla at ConAdv's ×2 and vanilla's ×1 over the seeds both have
        (10 and 3). Catches: pairing by list position (sorted seeds 3, 7, 10 against 2, 3,
        10), and either method at another setting (the other's, or ×1 for both)."""
        conadv = {s: t for s, (_, t) in VALUES[("conadv", 2.0)].items()}
        vanilla = {s: t for s, (_, t) in VALUES[("vanilla", 1.0)].items()}
        seeds = sorted(set(conadv) & set(vanilla))
        self.assertEqual(seeds, [3, 10])
        d = np.array([conadv[s] - vanilla[s] for s in seeds])
        half = T975_1 * np.std(d, ddof=1) / math.sqrt(len(d))
        for got in (
            self.report.tuning.differences[(BATCH, "conadv - vanilla")],
            self.report.differences[(BATCH, "conadv - vanilla")],
        ):
            self.assertEqual(got.seeds, (3, 10))
            self.assertAllClose(
                [got.mean, got.low, got.high], [d.mean(), d.mean() - half, d.mean() + half]
            )
        text = f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] (n=2)"
        self.assertIn(text, self.report.markdown)

    def test_the_count_line_every_setting_table_and_the_learning_rate_plot(self):
        """Catches: the count line missing or counting runs rather than settings, a
        setting left out of the table of every setting, the plot not written (or not
        listed in report.md) when several rates were swept, and its lines not the
        selection and test means over seeds against the learning rate."""
        line = (
            "3 learning rates × 1 warmup = 3 settings per (method, batch) cell, chosen on "
            f"{HELD_OUT} held-out training examples by mean selection top-1 over seeds"
        )
        self.assertEqual(self.report.tuning.counts, [line])
        self.assertIn(line, self.report.markdown)
        with open(os.path.join(self.out, "report.md")) as f:
            written = f.read()
        self.assertIn("![accuracy_vs_lr.png](accuracy_vs_lr.png)", written)
        self.assertTrue(os.path.exists(os.path.join(self.out, "accuracy_vs_lr.png")))
        for (method, m), by_seed in VALUES.items():
            selection, test = self.report.tuning.every[(method, BATCH, setting(method, m))]
            self.assertAllClose(selection.mean, np.mean([v for v, _ in by_seed.values()]))
            self.assertAllClose(test.mean, np.mean([t for _, t in by_seed.values()]))
        [axes] = self.report.figures["accuracy_vs_lr.png"].axes
        self.assertEqual(axes.get_xscale(), "log")
        drawn = {c.get_label(): c for c in axes.containers}
        self.assertCountEqual(
            drawn, ["vanilla selection", "vanilla test", "ConAdv selection", "ConAdv test"]
        )
        for label, container in drawn.items():
            name, what = label.split(" ")
            method = {"vanilla": "vanilla", "ConAdv": "conadv"}[name]
            line = container[0]
            self.assertEqual(line.get_linestyle(), "-" if what == "selection" else "--")
            self.assertAllClose(line.get_xdata(), [0.1 * m for m in MULTIPLIERS])
            index = 0 if what == "selection" else 1
            want = [np.mean([v[index] for v in VALUES[(method, m)].values()]) for m in MULTIPLIERS]
            self.assertAllClose(line.get_ydata(), want)

    def test_sharpness_is_that_of_the_chosen_setting(self):
        """Catches: sharpness cells of another learning rate than the chosen one (or of
        every rate pooled), or a sharpness column of the tuned table showing the other
        metric."""
        [group] = self.report.sharpness
        rows = [line for line in self.report.markdown.splitlines() if "| 64 | lr×" in line]
        for method, m in CHOSEN.items():
            want = {s: eigenvalue(method, m, s) for s in VALUES[(method, m)]}
            self.assertEqual(group.top_eigenvalue[(method, BATCH)].by_seed, want)
            cell = group.eps_sharpness[(method, BATCH)]
            self.assertAllClose(cell.mean, np.mean(list(want.values())) / 100)
            # The tuned table's row of the chosen setting: its columns end with the
            # eigenvalue and then the ε-sharpness.
            name = {"vanilla": "vanilla", "conadv": "ConAdv"}[method]
            # (The tuned table's rows have 11 columns, those of every setting 8.)
            [row] = [
                r for r in rows if r.startswith(f"| {name} | 64 | lr×{m:g},") and r.count("|") == 12
            ]
            columns = [c.strip() for c in row.strip("|").split("|")]
            eig = group.top_eigenvalue[(method, BATCH)]
            self.assertEqual(columns[-2], dataclasses.replace(eig, varied=()).text())
            self.assertEqual(columns[-1], dataclasses.replace(cell, varied=()).text())


def write_diverged(out, run, step=3):
    """A run whose loss went non-finite: run.json and diverged.json, no summary.json."""
    directory = os.path.join(out, "runs", run.name)
    os.makedirs(directory)
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump(run.record(), f)
    message = f"non-finite clean loss at step {step}; last good checkpoint ckpt-2"
    with open(os.path.join(directory, "diverged.json"), "w") as f:
        json.dump({"message": message, "step": step, "last_good_checkpoint_step": 2}, f)
    return directory


#: (method, batch, multiplier) -> seed -> (selection, test), or None: diverged. Vanilla at
#: batch 64: ×4 has the best selection top-1 on the seeds it finished (and would win even
#: with its diverged seed scored 0), ×2 beats ×1. At batch 128 every setting diverged on
#: some seed. ConAdv (×1, ×2) has seeds 1, 2, 3: it pairs with vanilla on 1 and 2.
DIVERGING = {
    ("vanilla", 64, 1.0): {0: (0.50, 0.40), 1: (0.52, 0.42), 2: (0.51, 0.41)},
    ("vanilla", 64, 2.0): {0: (0.60, 0.50), 1: (0.61, 0.55), 2: (0.62, 0.45)},
    ("vanilla", 64, 4.0): {0: (0.99, 0.90), 1: (0.98, 0.91), 2: None},
    ("vanilla", 128, 1.0): {0: None, 1: (0.5, 0.4), 2: (0.5, 0.4)},
    ("vanilla", 128, 2.0): {0: None, 1: None, 2: None},
    ("vanilla", 128, 4.0): {0: (0.5, 0.4), 1: None, 2: (0.5, 0.4)},
    ("conadv", 64, 1.0): {1: (0.70, 0.60), 2: (0.71, 0.66), 3: (0.72, 0.62)},
    ("conadv", 64, 2.0): {1: (0.60, 0.70), 2: (0.61, 0.71), 3: (0.62, 0.72)},
}


class DivergedSettingsTest(tf.test.TestCase):
    """A tuning sweep whose large learning rates diverged on some seeds (fake runs)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.out = tempfile.mkdtemp()
        for (method, batch, m), by_seed in DIVERGING.items():
            for seed, values in by_seed.items():
                run = tuned_run(method, seed, m, batch=batch)
                if values is None:
                    write_diverged(cls.out, run)
                else:
                    write_run(cls.out, run, summary(*values))
        [cls.report] = quiet_report(cls.out)

    def test_a_setting_that_diverged_on_a_compared_seed_is_never_chosen(self):
        """Catches: a diverged run dropped (×4 then wins on seeds 0 and 1), or scored 0
        (×4 still wins), or the setting silently missing from the table of every setting."""
        tuned = self.report.tuning
        self.assertEqual(self.report.best[("vanilla", 64)], setting("vanilla", 2.0))
        self.assertEqual(tuned.chosen_on[("vanilla", 64)], "selection")
        self.assertEqual(tuned.diverged[("vanilla", 64, setting("vanilla", 4.0))], (1, 3))
        self.assertEqual(self.report.top1[("vanilla", 64)].by_seed, {0: 0.50, 1: 0.55, 2: 0.45})
        [row] = [
            line
            for line in self.report.markdown.splitlines()
            if line.startswith("| vanilla | 64 | lr×4")
        ]
        self.assertIn("| diverged (1 of 3 seeds) |", row)
        self.assertFalse(row.rstrip(" |").endswith("✓"))
        # The paired difference pairs ConAdv (×1) and vanilla (×2) by seed: 1 and 2.
        difference = tuned.differences[(64, "conadv - vanilla")]
        self.assertEqual(self.report.best[("conadv", 64)], setting("conadv", 1.0))
        self.assertEqual(difference.seeds, (1, 2))
        self.assertAllClose(difference.mean, np.mean([0.60 - 0.55, 0.66 - 0.45]))

    def test_a_setting_that_diverged_on_a_seed_the_others_lack_is_never_chosen(self):
        """Catches: a setting ruled out only for a divergence at the seeds all settings
        have (×2, best on seeds 0 and 1, would win, and its diverged seed 2 would vanish
        from the test top-1 and the paired differences)."""
        from conadv.studies import tuning

        rows = [
            {
                "method": "vanilla",
                "batch_size": 64,
                "seed": seed,
                "lr_multiplier": m,
                "selection_top1": value,
                "eval_top1": value,
            }
            for m, values in ((1.0, {0: 0.80, 1: 0.80}), (2.0, {0: 0.90, 1: 0.90}))
            for seed, value in values.items()
        ]
        rows.append(
            {
                "method": "vanilla",
                "batch_size": 64,
                "seed": 2,
                "lr_multiplier": 2.0,
                "diverged": True,
                "selection_top1": None,
                "eval_top1": None,
            }
        )
        best, how = tuning.choose(rows)
        self.assertEqual((best[("vanilla", 64)], how[("vanilla", 64)]), ((), "selection"))

    def test_a_cell_whose_every_setting_diverged_is_named_in_one_line(self):
        """Catches: a crash, or a setting chosen among diverged ones, where every setting
        of a cell diverged on some seed."""
        self.assertNotIn(("vanilla", 128), self.report.best)
        self.assertNotIn(("vanilla", 128), self.report.top1)
        line = (
            "vanilla at batch 128: no setting chosen, every setting diverged (lr×1: 1 of 3 "
            "seeds; lr×2: 3 of 3 seeds; lr×4: 1 of 3 seeds)."
        )
        self.assertIn(line, self.report.markdown.splitlines())
        tuned = self.report.markdown.split("## Tuned comparison")[1].split("\n## ")[0]
        self.assertIn(line, tuned)

    def test_no_mean_counts_a_diverged_run_and_the_csv_says_which_diverged(self):
        """Catches: a diverged run counted as a seed (n), or left out of results.csv."""
        markdown = self.report.markdown
        self.assertIn("18 finished runs and 6 diverged (no metrics)", markdown)
        every = self.report.tuning.every
        self.assertEqual(every[("vanilla", 64, setting("vanilla", 4.0))], (None, None))
        selection, _ = every[("vanilla", 128, setting("vanilla", 4.0))]
        self.assertIsNone(selection)  # out: k of n shown instead
        with open(os.path.join(self.out, "results.csv")) as f:
            rows = list(csv.DictReader(f))
        self.assertLen(rows, 24)
        diverged = [r for r in rows if r["diverged"] == "True"]
        self.assertLen(diverged, 6)
        self.assertTrue(all(r["eval_top1"] == "" for r in diverged))
        self.assertLen([r for r in rows if r["diverged"] == "False"], 18)

    def test_the_learning_rate_plot_leaves_diverged_settings_off_its_lines(self):
        """Catches: a diverged rate on a line (as NaN or as a number)."""
        axes = self.report.figures["accuracy_vs_lr.png"].axes
        self.assertLen(axes, 2)  # batch 64 and batch 128 (its x marks alone)
        drawn = {c.get_label(): c for c in axes[0].containers}
        self.assertAllClose(drawn["vanilla selection"][0].get_xdata(), [0.1, 0.2])
        self.assertAllClose(drawn["vanilla selection"][0].get_ydata(), [0.51, 0.61])
        [marks] = [line for line in axes[0].lines if line.get_label() == "vanilla diverged"]
        self.assertAllClose(marks.get_xdata(), [0.4])
        self.assertEqual(axes[1].containers, [])
        [marks] = [line for line in axes[1].lines if line.get_label() == "vanilla diverged"]
        self.assertAllClose(marks.get_xdata(), [0.1, 0.2, 0.4])


class NoChoiceOnTestTest(tf.test.TestCase):
    def test_several_learning_rates_without_selection_numbers_stop_the_report(self):
        """Catches: a learning rate chosen on test top-1 when the runs have no selection
        numbers (the older rule for ε, τ and source)."""
        out = tempfile.mkdtemp(dir=self.get_temp_dir())
        write_study(out, with_selection=False)
        with self.assertRaises(SystemExit) as raised:
            with contextlib.redirect_stdout(io.StringIO()):
                experiments.main(["report", f"--out={out}"])
        message = str(raised.exception.code)
        self.assertNotIn("\n", message)
        self.assertIn("never chooses a learning rate", message)
        self.assertIn("--selection_examples", message)

    def test_a_sweep_without_the_axes_has_no_learning_rate_plot(self):
        """Catches: the learning-rate plot written for a sweep of one learning rate (with
        selection numbers or without), or a tuned section without selection numbers or
        several rates."""
        for with_selection in (False, True):
            out = tempfile.mkdtemp(dir=self.get_temp_dir())
            for (method, m), by_seed in VALUES.items():
                if m == 1.0:
                    for seed, (selection, test) in by_seed.items():
                        run = tuned_run(method, seed, m)
                        write_run(out, run, summary(selection, test, with_selection))
            [report] = quiet_report(out)
            self.assertEqual(report.tuning is None, not with_selection)
            self.assertNotIn("accuracy_vs_lr.png", report.figures)
            self.assertFalse(os.path.exists(os.path.join(out, "accuracy_vs_lr.png")))
            if with_selection:
                self.assertIn(
                    "1 learning rate × 1 warmup = 1 setting per (method, batch) cell.",
                    report.markdown,
                )


class SweepAxesTest(tf.test.TestCase):
    def parse(self, *extra):
        return experiments.parse(
            [
                "sweep",
                "--out=/nonexistent",
                "--methods=vanilla,conadv",
                "--batch_sizes=16,64",
                "--seeds=0",
                "--base_batch_size=16",
                "--dataset=digits",
                *extra,
            ]
        )

    def test_runs_of_other_multipliers_are_other_runs_and_x1_keeps_its_name(self):
        """Catches: the multiplier not applied to main.py's --learning_rate (or
        --warmup_epochs), so the identity (taken from the run's main.py flags) is the ×1
        run's; a name that does not spell it; and a ×1 run renamed by the axes (finished
        runs of an existing study would be trained again)."""
        plain = {(r.method, r.batch_size): r for r in experiments.plan(*self.parse()[1:])}
        _, fv, main_fv, main_args = self.parse()
        # The axes set after parsing (which would refuse several rates without
        # --selection_examples): the plan itself is what is tested.
        fv.learning_rates, fv.warmups = ["1", "2"], ["1", "0.5"]
        runs = experiments.plan(fv, main_fv, main_args)
        self.assertLen(runs, 2 * 2 * 4)
        # Seed-major, then batch, then method, then the multipliers.
        self.assertEqual(
            [(r.batch_size, r.method, r.lr_multiplier, r.warmup_multiplier) for r in runs[:4]],
            [(16, "vanilla", 1.0, 1.0), (16, "vanilla", 1.0, 0.5)]
            + [(16, "vanilla", 2.0, 1.0), (16, "vanilla", 2.0, 0.5)],
        )
        self.assertLen({r.identity for r in runs}, len(runs))
        self.assertLen({r.name for r in runs}, len(runs))
        for run in runs:
            base = plain[(run.method, run.batch_size)]
            self.assertAllClose(run.learning_rate, base.learning_rate * run.lr_multiplier)
            self.assertAllClose(run.warmup_epochs, base.warmup_epochs * run.warmup_multiplier)
            self.assertIn(f"--learning_rate={run.learning_rate!r}", run.flags())
            values = experiments._main_values(main_args, run)
            self.assertAllClose(values.learning_rate, run.learning_rate)
            self.assertEqual(run.record()["lr_multiplier"], run.lr_multiplier)
            # The name a sweep without the axes gives (literally: not the same code twice).
            self.assertRegex(base.name, r"^(vanilla|conadv)_b\d+(_eps4_tau1)?_seed0_[0-9a-f]{8}$")
            if run.lr_multiplier == 1 and run.warmup_multiplier == 1:
                self.assertEqual(run.name, base.name)
                self.assertEqual(run.identity, base.identity)
            else:
                self.assertNotEqual(run.identity, base.identity)
            self.assertEqual("_lrx2_" in run.name, run.lr_multiplier == 2)
            self.assertEqual("_wux0.5_" in run.name, run.warmup_multiplier == 0.5)
        # Two runs that differ only in the learning rate.
        x1, x2 = (
            next(
                r
                for r in runs
                if r.method == "conadv"
                and r.batch_size == 64
                and r.lr_multiplier == m
                and r.warmup_multiplier == 1
            )
            for m in (1.0, 2.0)
        )
        self.assertNotEqual(x1.identity, x2.identity)
        self.assertNotEqual(x1.name, x2.name)
        self.assertEqual(x1.config, x2.config)  # one report configuration

    def test_several_rates_without_held_out_data_are_refused_in_one_line(self):
        """Catches: a tuning sweep allowed without --selection_examples (its report could
        only choose the learning rate on the test set)."""
        for extra in (["--learning_rates=0.5,1,2"], ["--warmups=1,2"]):
            with self.assertRaises(SystemExit) as raised:
                # A dry run: were the refusal missing, nothing would be trained.
                experiments.main(
                    ["sweep", "--out=/nonexistent", "--dataset=digits", "--dry_run", *extra]
                )
            message = str(raised.exception.code)
            self.assertNotIn("\n", message)
            self.assertIn(
                "tuning needs held-out training data to choose on: add --selection_examples N",
                message,
            )
        # Multiples of no warmup are one run under several names; inf is no rate.
        for extra, wanted in (
            (["--warmups=0.5,2", "--warmup_epochs=0"], "every multiple is the same run"),
            (["--learning_rates=1,inf"], "is not a finite multiplier"),
        ):
            with self.assertRaises(SystemExit) as raised:
                experiments.main(
                    ["sweep", "--out=/nonexistent", "--dataset=digits", "--dry_run"]
                    + ["--selection_examples=100", *extra]
                )
            self.assertIn(wanted, str(raised.exception.code))
            self.assertNotIn("\n", str(raised.exception.code))
        # One rate: nothing to choose among; the dry run lists its rate at each batch.
        plain = {r.batch_size: r for r in experiments.plan(*self.parse("--methods=vanilla")[1:])}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            experiments.main(
                ["sweep", "--out=/nonexistent", "--methods=vanilla", "--batch_sizes=16,64"]
                + ["--base_batch_size=16", "--seeds=0", "--dataset=digits", "--dry_run"]
                + ["--learning_rates=2"]
            )
        for batch, run in plain.items():
            rate = 2 * run.learning_rate
            self.assertIn(f"batch {batch}: learning rates ×2 = {rate:.4g}", out.getvalue())
            self.assertIn(
                f"batch {batch}: warmups (epochs) ×1 = {run.warmup_epochs:.4g}", out.getvalue()
            )
            self.assertIn(
                run.name.replace("_seed0", "_lrx2_seed0").rsplit("_", 1)[0], out.getvalue()
            )
        for held_out in (1000, 0.1):
            sweep_flags.require_held_out_data([1.0, 2.0], [1.0], held_out)
        for held_out in (None, 0):
            with self.assertRaisesRegex(FlagError, "add --selection_examples N"):
                sweep_flags.require_held_out_data([1.0, 2.0], [1.0], held_out)
