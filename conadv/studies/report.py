"""A sweep's results as the paper's tables: ``results.csv`` and ``report.md``, from every
run's ``run.json`` and ``summary.json`` (the plots: ``figures.py``).

Runs are grouped into sections by their own recorded configuration
(``sections.py``).

Top-1 is the evaluation (test) top-1 of ``summary.json`` (with the BatchNorm
statistics it names, precise by default). A cell over seeds is
"mean ± sample standard deviation (n)". Sharpness (``sharpness/*.json``, a
file per measurement setting) is reported per setting (``--sharpness_*``): measurements of other
settings never share a cell or a paired difference.

Where a (method, batch) was trained at several settings (learning-rate and
warmup multipliers, ε, τ, source), the method × batch tables use one of them,
chosen by ``tuning.py``: where every run of the cell has a selection top-1
(main.py ``--selection_examples``), the setting of best mean selection top-1
over seeds. That choice is made on held-out *training* data, never on the
test set, so the test top-1 at the chosen setting is not optimistic; the
tuned comparison then shows each method at its own setting, how many
settings each cell tried and every setting's selection and test top-1.
Without selection numbers, ε, τ or source is chosen by the best mean test
top-1 (named in the cell): a choice made on the same numbers, so those cells
are optimistic, the more so the more settings were tried; several learning
rates or warmups without selection numbers are refused (``ReportError``).
Paired differences take the same seed of both methods (same initial weights
and data order), each method at its own chosen setting, and give a Student-t
95 % interval over seeds (``statistics.paired_difference``).

A diverged run (``diverged.json`` and no ``summary.json``: its loss went
non-finite, ``conadv/studies/runner.py``) is a row of its own (``diverged``
true, no metrics): no mean counts it as a seed with a value, and a setting
with a diverged run at any seed is never chosen
(``tuning.py``); the tuned section shows it as "diverged (k of n seeds)", and
names a cell whose every setting diverged.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os

from conadv.studies import statistics as stats
from conadv.studies import tuning
from conadv.studies.cells import (
    DIFFERENCES,
    batches_in,
    metric_cells,
    table_cells,
    varied_settings,
)
from conadv.studies.sections import ReportError, config_key, configurations, short

CSV_COLUMNS = (
    "name",
    "method",
    "batch_size",
    "seed",
    "attack_eps",
    "staleness",
    "attack_source",
    "diverged",
    "learning_rate",
    "warmup_epochs",
    "lr_multiplier",
    "warmup_multiplier",
    "train_steps",
    "epochs",
    "eval_top1",
    "eval_top1_moving_average",
    "train_top1",
    "selection_top1",
    "selection_examples",
    "generalization_gap",
    "robust_top1",
    "top_eigenvalue",
    "eps_sharpness",
    "images_per_second",
    "wall_time_s",
)


# ----------------------------------------------------------------- collecting


def collect(out: str) -> list[dict]:
    """One row per finished or diverged run under ``OUT/runs`` (a run with neither
    summary.json nor diverged.json is left out); a diverged run's metrics are None."""
    from conadv.run.nonfinite import DIVERGED_FILE

    rows = []
    for directory in sorted(glob.glob(os.path.join(out, "runs", "*", ""))):
        directory = os.path.dirname(directory)
        path = os.path.join(directory, "summary.json")
        diverged = os.path.join(directory, DIVERGED_FILE)
        if not os.path.exists(path) and not os.path.exists(diverged):
            continue
        with open(os.path.join(directory, "run.json")) as f:
            run = json.load(f)
        if not os.path.exists(path):
            with open(diverged) as f:
                record = json.load(f)
            rows.append(_diverged_row(run, directory, record))
            continue
        with open(path) as f:
            summary = json.load(f)
        measurements = read_measurements(directory)
        sharpness = measurements[-1] if measurements else {}  # the CSV's: the latest
        train, test = summary.get("train_top1"), summary.get("eval_top1")
        rows.append(
            {
                **{key: run.get(key) for key in CSV_COLUMNS if key in run},
                "directory": directory,
                "diverged": False,
                "train_steps": summary.get("train_steps"),
                "epochs": summary.get("epochs"),
                "eval_top1": test,
                "eval_top1_moving_average": summary.get("eval_top1_moving_average"),
                "train_top1": train,
                # On the held-out training examples (main.py --selection_examples).
                "selection_top1": summary.get("selection_top1"),
                "selection_examples": summary.get("selection_examples"),
                "generalization_gap": None if train is None or test is None else train - test,
                "robust_top1": summary.get("eval_robust_top1"),
                "top_eigenvalue": sharpness.get("top_eigenvalue"),
                "eps_sharpness": sharpness.get("eps_sharpness"),
                "sharpness_settings": sharpness.get("settings"),
                "measurements": measurements,
                "images_per_second": summary.get("images_per_second"),
                "wall_time_s": summary.get("wall_time_s"),
                # The run's configuration (its identity less the grid's axes).
                "config": run.get("config") or {},
                "data_dir": run.get("data_dir"),
            }
        )
    return rows


def _diverged_row(run: dict, directory: str, record: dict) -> dict:
    """A diverged run's row: its grid point and configuration, every metric None."""
    return {
        **{key: run.get(key) for key in CSV_COLUMNS if key in run},
        "directory": directory,
        "diverged": True,
        "diverged_step": record.get("step"),
        "diverged_message": record.get("message"),
        "measurements": [],
        "config": run.get("config") or {},
        "data_dir": run.get("data_dir"),
    }


def read_measurements(directory: str) -> list[dict]:
    """A run's sharpness measurements, one per ``--sharpness_*`` setting, the latest last
    (``sharpness/*.json``; a run measured before they were kept: ``sharpness.json``)."""
    from flags import sharpness as sharpness_flags

    paths = glob.glob(os.path.join(directory, sharpness_flags.MEASUREMENTS_DIR, "*.json"))
    if not paths and os.path.exists(os.path.join(directory, "sharpness.json")):
        paths = [os.path.join(directory, "sharpness.json")]
    measurements = []
    for path in sorted(paths, key=os.path.getmtime):
        with open(path) as f:
            measurement = json.load(f)
        if measurement.get("settings") is None:
            raise ReportError(
                f"{path} does not record its --sharpness_* settings; measure it again "
                "(python main.py --mode=sharpness --model_dir=...)"
            )
        measurements.append(measurement)
    return measurements


def write_csv(rows: list[dict], path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})


# ------------------------------------------------------------------ the cells


def best_settings(rows: list[dict]) -> dict:
    """(method, batch) -> the chosen setting (``tuning.choose``: on selection top-1 where
    every run of the cell has one, else ε, τ and source on test top-1)."""
    return tuning.choose(rows)[0]


# -------------------------------------------------------------------- tables


@dataclasses.dataclass
class SharpnessGroup:
    """The sharpness of the runs measured with one ``--sharpness_*`` setting."""

    settings: dict
    top_eigenvalue: dict  # (method, batch) -> Cell
    eps_sharpness: dict  # (method, batch) -> Cell
    #: (metric, batch, "conadv - vanilla") -> PairedDifference, for both metrics
    differences: dict

    def label(self) -> str:
        return ", ".join(f"{name}={short(value)}" for name, value in sorted(self.settings.items()))


@dataclasses.dataclass
class Report:
    """The numbers of every table (for plots and tests) and the Markdown."""

    rows: list[dict]
    best: dict
    top1: dict  # (method, batch) -> Cell
    train_top1: dict
    gap: dict
    robust: dict
    differences: dict  # (batch, "conadv - vanilla") -> PairedDifference | None
    eps_cells: dict  # (method, batch, setting) -> Cell, ConAdv only
    throughput: dict  # (method, batch) -> Cell of images/s
    throughput_ratios: dict  # (batch, "conadv / disadv") -> ratio of means
    #: One group per ``--sharpness_*`` setting the runs were measured with.
    sharpness: list = dataclasses.field(default_factory=list)
    #: (metric, batch, "conadv - vanilla") -> PairedDifference, for the gap
    metric_differences: dict = dataclasses.field(default_factory=dict)
    #: (method, batch, rest) -> (separate Cell, clean_pass Cell, PairedDifference | None) of
    #: eval top-1, where both sources were trained (``source_differences``).
    source_differences: dict = dataclasses.field(default_factory=dict)
    #: (method, batch, setting) -> Cell of eval top-1 for DisAdv and ConAdv (the ε plot).
    setting_cells: dict = dataclasses.field(default_factory=dict)
    #: The tuned comparison (``tuning.py``): where runs have selection numbers or several
    #: learning rates or warmups were trained; else None.
    tuning: tuning.Tuning | None = None
    #: What sets this configuration apart from the others ("" if it is the only one).
    title: str = ""
    markdown: str = ""


def build_all(rows: list[dict]) -> list[Report]:
    """One report per configuration (``configurations``)."""
    return [build(group, title) for title, group in configurations(rows)]


def _paired(cells: dict, batch: int, name: str):
    first, second = name.split(" - ")
    if (first, batch) in cells and (second, batch) in cells:
        return stats.paired_difference(
            cells[(first, batch)].by_seed, cells[(second, batch)].by_seed
        )
    return None


def _metric_differences(metric: str, cells: dict, batches: list[int]) -> dict:
    out = {}
    for batch in batches:
        for name in DIFFERENCES:
            difference = _paired(cells, batch, name)
            if difference is not None:
                out[(metric, batch, name)] = difference
    return out


def source_differences(rows: list[dict], metric: str = "eval_top1") -> dict:
    """The free attack against the separate one: per method and batch (and any other
    setting equal), ``metric`` of each and clean_pass − separate paired over seeds."""
    cells = metric_cells(rows, metric)
    out = {}
    for (method, batch, setting), cell in cells.items():
        if ("source", "clean_pass") not in setting:
            continue
        other = tuple(
            ("source", "separate") if item == ("source", "clean_pass") else item for item in setting
        )
        if (method, batch, other) in cells:
            separate = cells[(method, batch, other)]
            rest = tuple(item for item in setting if item[0] != "source")
            out[(method, batch, rest)] = (
                separate,
                cell,
                stats.paired_difference(cell.by_seed, separate.by_seed),
            )
    return out


def sharpness_groups(rows: list[dict], best: dict) -> list[SharpnessGroup]:
    """The sharpness cells of each measurement setting, at each method and batch's best
    setting, and their paired differences (never across measurement settings)."""
    settings = {}
    for row in rows:
        for measurement in row.get("measurements") or []:
            settings.setdefault(config_key(measurement["settings"]), measurement["settings"])
    varied = varied_settings(rows)  # the section's, as in its other tables
    groups = []
    for key in sorted(settings):
        measured = [
            {
                **row,
                "top_eigenvalue": m.get("top_eigenvalue"),
                "eps_sharpness": m.get("eps_sharpness"),
            }
            for row in rows
            for m in row.get("measurements") or []
            if config_key(m["settings"]) == key
        ]
        group = SharpnessGroup(
            settings=settings[key],
            top_eigenvalue=table_cells(measured, "top_eigenvalue", best, varied),
            eps_sharpness=table_cells(measured, "eps_sharpness", best, varied),
            differences={},
        )
        for metric in ("top_eigenvalue", "eps_sharpness"):
            group.differences.update(
                _metric_differences(metric, getattr(group, metric), batches_in(rows))
            )
        groups.append(group)
    return groups


def build(rows: list[dict], title: str = "") -> Report:
    best, chosen_on = tuning.choose(rows)
    top1 = table_cells(rows, "eval_top1", best)
    differences = {}
    for batch in batches_in(rows):
        if ("conadv", batch) not in top1:
            continue
        for other in ("vanilla", "disadv"):
            if (other, batch) in top1:
                differences[(batch, f"conadv - {other}")] = stats.paired_difference(
                    top1[("conadv", batch)].by_seed, top1[(other, batch)].by_seed
                )
    throughput = table_cells(rows, "images_per_second", best)
    ratios = {}
    for batch in batches_in(rows):
        if ("conadv", batch) in throughput:
            for other in ("disadv", "vanilla"):
                if (other, batch) in throughput:
                    ratios[(batch, f"conadv / {other}")] = (
                        throughput[("conadv", batch)].mean / throughput[(other, batch)].mean
                    )
    all_settings = metric_cells(rows, "eval_top1")
    gap = table_cells(rows, "generalization_gap", best)
    return Report(
        rows=rows,
        best=best,
        top1=top1,
        train_top1=table_cells(rows, "train_top1", best),
        gap=gap,
        robust=table_cells(rows, "robust_top1", best),
        differences=differences,
        eps_cells={k: c for k, c in all_settings.items() if k[0] == "conadv"},
        throughput=throughput,
        throughput_ratios=ratios,
        sharpness=sharpness_groups(rows, best),
        metric_differences=_metric_differences("generalization_gap", gap, batches_in(rows)),
        source_differences=source_differences(rows),
        setting_cells={k: c for k, c in all_settings.items() if k[0] != "vanilla"},
        tuning=tuning.build(rows, best, chosen_on, top1) if tuning.is_tuned(rows) else None,
        title=title,
    )
