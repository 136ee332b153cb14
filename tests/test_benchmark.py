"""The throughput benchmark: interleaved rounds, one entry per method and batch, the
ratios as medians of per-round ratios, and a plot of exactly those numbers."""

import json
import os
import statistics
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from conadv.studies import benchmark

METHODS = ("vanilla", "disadv", "conadv")
BATCHES = (2, 4)


class ThroughputSweepTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        cls.json_path = os.path.join(cls.dir, "throughput.json")
        cls.png_path = os.path.join(cls.dir, "throughput.png")
        cls.result = benchmark.main(
            [
                "--model=resnet8",
                "--width_multiplier=0.25",
                "--image_size=16",
                "--batch_sizes=2,4",
                "--loops=3",
                "--steps_per_loop=1",
                f"--output_json={cls.json_path}",
                f"--plot={cls.png_path}",
            ]
        )
        with open(cls.json_path) as f:
            cls.written = json.load(f)

    def test_one_entry_per_method_and_batch(self):
        rows = self.written["results"]
        self.assertCountEqual(
            [(r["method"], r["batch_per_replica"]) for r in rows],
            [(m, b) for m in METHODS for b in BATCHES],
        )
        for row in rows:
            self.assertLen(row["rounds"], 3)
            # Catches: the mean (or the last round) reported instead of the median.
            self.assertEqual(row["images_per_second"], statistics.median(row["rounds"]))
            self.assertGreater(row["images_per_second"], 0)

    def test_rounds_interleave_the_methods_and_rotate(self):
        """Catches: each setting timed in its own block, one after another; every round
        in the same order (a position effect would favour the same settings each time);
        every round going the same way round (each setting always timed after the same
        one)."""
        keys = [r["key"] for r in self.written["results"]]
        n = len(keys)
        forward = [[keys[(r // 2 + i) % n] for i in range(n)] for r in range(3)]
        rounds = [circle[::-1] if r % 2 else circle for r, circle in enumerate(forward)]
        self.assertEqual(self.written["timing_order"], [key for r in rounds for key in r])
        # Settings are timed after both their neighbours, not always after the same one
        # (in 3 rounds, all but one; going one way round every round, none).
        before = {key: set() for key in keys}
        for r in rounds:
            for previous, key in zip(r, r[1:]):
                before[key].add(previous)
        self.assertGreaterEqual(sum(len(b) == 2 for b in before.values()), n - 1, before)
        # Within one batch, a round goes vanilla, DisAdv, ConAdv.
        self.assertEqual(keys, [f"{m}/batch={b}" for b in BATCHES for m in METHODS])

    def test_ratios_are_medians_of_per_round_ratios(self):
        """Catches: the ratio of two medians, or the ratio inverted."""
        rows = {r["key"]: r["rounds"] for r in self.written["results"]}
        for batch in BATCHES:
            conadv = rows[f"conadv/batch={batch}"]
            for other in ("disadv", "vanilla"):
                expected = float(
                    np.median(np.array(conadv) / np.array(rows[f"{other}/batch={batch}"]))
                )
                name = f"conadv/batch={batch}_over_{other}/batch={batch}"
                self.assertAllClose(self.written["ratios"][name], expected, rtol=1e-12)
                [row] = [
                    r
                    for r in self.written["ratio_rows"]
                    if r["series"] == f"conadv / {other}" and r["batch_per_replica"] == batch
                ]
                self.assertAllClose(row["ratio"], expected, rtol=1e-12)

    def test_plot_draws_exactly_the_written_numbers(self):
        with Image.open(self.png_path) as image:
            image.verify()
            self.assertEqual(image.format, "PNG")
        again = os.path.join(self.dir, "again.png")
        figure = benchmark.plot(self.written, again)
        with open(self.png_path, "rb") as a, open(again, "rb") as b:
            self.assertEqual(a.read(), b.read())  # the figure checked is the one written
        speed_axes, ratio_axes = figure.axes
        drawn = {line.get_label(): line for line in speed_axes.lines}
        self.assertCountEqual(drawn, METHODS)
        for row in self.written["results"]:
            line = drawn[row["method"]]
            # Catches: another setting's (or batch's) speeds on this line.
            index = list(line.get_xdata()).index(row["batch_per_replica"])
            self.assertEqual(line.get_ydata()[index], row["images_per_second"])
        ratios = {line.get_label(): line for line in ratio_axes.lines if line.get_label()[0] != "_"}
        self.assertCountEqual(ratios, ["conadv / disadv", "conadv / vanilla"])
        for row in self.written["ratio_rows"]:
            line = ratios[row["series"]]
            index = list(line.get_xdata()).index(row["batch_per_replica"])
            self.assertEqual(line.get_ydata()[index], row["ratio"])
        self.assertEqual(speed_axes.get_xscale(), "log")


class BenchmarkFlagsTest(tf.test.TestCase):
    def test_bad_values_end_with_one_line_naming_the_flag(self):
        for argv, flag in [
            (["--batch_sizes=0,4"], "--batch_sizes"),
            (["--staleness=1,1"], "--staleness"),
            (["--methods=vanilla,advprop"], "--methods"),
            (["--update_pass=both"], "--update_pass"),
            (["--model=resnet9"], "--model"),
            (["--loops=0"], "--loops"),
            (["--no_such_flag=1"], "no_such_flag"),
        ]:
            with self.assertRaises(SystemExit) as raised:
                benchmark.main(argv)
            message = str(raised.exception.code)
            self.assertIn(flag, message, argv)
            self.assertNotIn("\n", message, argv)


class AttackSourceTest(tf.test.TestCase):
    """``--attack_source separate,clean_pass``: both timed per method, and the free
    attack's speed over the separate attack's as the median of per-round ratios."""

    def test_clean_pass_beside_separate(self):
        result = benchmark.main(
            [
                "--model=resnet8",
                "--width_multiplier=0.25",
                "--image_size=16",
                "--batch_sizes=2",
                "--loops=2",
                "--steps_per_loop=1",
                "--methods=vanilla,conadv",
                "--attack_source=separate,clean_pass",
            ]
        )
        rows = {r["key"]: r["rounds"] for r in result["results"]}
        self.assertCountEqual(rows, ["vanilla", "conadv/separate", "conadv/clean_pass"])
        expected = float(
            np.median(np.array(rows["conadv/clean_pass"]) / np.array(rows["conadv/separate"]))
        )
        name = "conadv/clean_pass_over_conadv/separate"
        self.assertAllClose(result["ratios"][name], expected, rtol=1e-12)
        self.assertIn("conadv/clean_pass_over_vanilla", result["ratios"])
        self.assertEqual(result["ideal_clean_pass_conadv_over_vanilla"], 0.5)

    def test_disadv_with_the_free_attack_is_timed_once_whatever_the_update_pass(self):
        """Catches: DisAdv with clean_pass (two passes whatever ``--update_pass`` says)
        timed once per update pass, the same code twice and a meaningless ratio; and
        ConAdv with the concatenated pass left without its DisAdv baseline."""
        import types

        from conadv.studies import timed_loop

        fv = types.SimpleNamespace(
            methods=["vanilla", "disadv", "conadv"],
            update_pass=["concatenated", "separate"],
            staleness=["1"],
            batch_sizes=["2"],
            attack_source=["separate", "clean_pass"],
        )
        passes = fv.update_pass, fv.staleness, fv.batch_sizes, fv.attack_source
        keys = [s.key(*passes) for s in timed_loop.settings(fv)]
        self.assertLen(keys, len(set(keys)))
        self.assertEqual(
            [k for k in keys if k.startswith("disadv/clean_pass")], ["disadv/clean_pass/separate"]
        )
        self.assertIn("conadv/clean_pass/concatenated", keys)
        conadv = next(
            s for s in timed_loop.settings(fv) if s.key(*passes) == "conadv/clean_pass/concatenated"
        )
        baselines = {s.key(*passes) for s in benchmark._baselines(conadv, fv.update_pass)}
        self.assertEqual(baselines, {"disadv/clean_pass/separate", "vanilla"})
        # DisAdv's free attack over its separate attack, in each update form timed.
        rounds = {s: [1.0 + i] for i, s in enumerate(timed_loop.settings(fv))}
        ratios = benchmark.ratios(rounds, fv)
        for update_pass in fv.update_pass:
            self.assertIn(f"disadv/clean_pass/separate_over_disadv/separate/{update_pass}", ratios)
