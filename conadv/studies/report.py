"""A sweep's results as the paper's tables: ``results.csv`` and ``report.md``, from every
run's ``run.json`` and ``summary.json`` (the plots: ``figures.py``).

Top-1 is the evaluation top-1 of ``summary.json`` (with the BatchNorm
statistics it names, precise by default). A cell over seeds is
"mean ± sample standard deviation (n)". Where ε or τ was swept, the
method × batch tables use, for each method and batch, the setting with the
best mean top-1 (named in the cell): a choice made on the same numbers, so
those cells are optimistic, the more so the more settings were tried.
Paired differences take the same seed of both methods (same initial weights
and data order) and give a Student-t 95 % interval over seeds
(``statistics.paired_difference``).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from collections import defaultdict

from conadv.studies import statistics as stats

METHOD_ORDER = ("vanilla", "disadv", "conadv")
METHOD_NAMES = {"vanilla": "vanilla", "disadv": "DisAdv", "conadv": "ConAdv"}

CSV_COLUMNS = (
    "name",
    "method",
    "batch_size",
    "seed",
    "attack_eps",
    "staleness",
    "learning_rate",
    "warmup_epochs",
    "train_steps",
    "epochs",
    "eval_top1",
    "eval_top1_moving_average",
    "train_top1",
    "generalization_gap",
    "robust_top1",
    "images_per_second",
    "wall_time_s",
)


# ----------------------------------------------------------------- collecting


def collect(out: str) -> list[dict]:
    """One row per finished run under ``OUT/runs`` (a run without summary.json is left out)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "summary.json"))):
        directory = os.path.dirname(path)
        with open(os.path.join(directory, "run.json")) as f:
            run = json.load(f)
        with open(path) as f:
            summary = json.load(f)
        train, test = summary.get("train_top1"), summary.get("eval_top1")
        rows.append(
            {
                **{key: run.get(key) for key in CSV_COLUMNS if key in run},
                "directory": directory,
                "train_steps": summary.get("train_steps"),
                "epochs": summary.get("epochs"),
                "eval_top1": test,
                "eval_top1_moving_average": summary.get("eval_top1_moving_average"),
                "train_top1": train,
                "generalization_gap": None if train is None or test is None else train - test,
                "robust_top1": summary.get("eval_robust_top1"),
                "images_per_second": summary.get("images_per_second"),
                "wall_time_s": summary.get("wall_time_s"),
            }
        )
    return rows


def write_csv(rows: list[dict], path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})


# ------------------------------------------------------------------ the cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One metric of one configuration over seeds."""

    by_seed: dict  # seed -> value
    setting: tuple = ()  # (("ε", 4.0), ("τ", 1)) where swept and chosen

    @property
    def values(self) -> list[float]:
        return [self.by_seed[s] for s in sorted(self.by_seed)]

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return stats.mean(self.values)

    @property
    def std(self) -> float | None:
        return stats.sample_std(self.values)

    def text(self, digits: int = 4) -> str:
        spread = "" if self.std is None else f" ± {self.std:.{digits}f}"
        chosen = ", ".join(f"{name}={value:g}" for name, value in self.setting)
        return f"{self.mean:.{digits}f}{spread} (n={self.n}{', ' + chosen if chosen else ''})"


def setting_of(row: dict) -> tuple:
    out = []
    if row.get("attack_eps") is not None:
        out.append(("ε", row["attack_eps"]))
    if row.get("staleness") is not None:
        out.append(("τ", row["staleness"]))
    return tuple(out)


def _cells(rows: list[dict], metric: str) -> dict:
    """(method, batch, setting) -> Cell of ``metric`` over seeds."""
    grouped = defaultdict(dict)
    for row in rows:
        if row.get(metric) is not None:
            key = (row["method"], row["batch_size"], setting_of(row))
            grouped[key][row["seed"]] = row[metric]
    return {key: Cell(by_seed, key[2]) for key, by_seed in grouped.items()}


def best_settings(rows: list[dict]) -> dict:
    """(method, batch) -> the setting (ε, τ) with the best mean eval top-1."""
    best = {}
    for (method, batch, setting), cell in _cells(rows, "eval_top1").items():
        key = (method, batch)
        if key not in best or cell.mean > best[key][1]:
            best[key] = (setting, cell.mean)
    return {key: setting for key, (setting, _) in best.items()}


def table_cells(rows: list[dict], metric: str, best: dict) -> dict:
    """(method, batch) -> Cell of ``metric`` at that method and batch's best setting."""
    out = {}
    for (method, batch, setting), cell in _cells(rows, metric).items():
        if best.get((method, batch)) == setting:
            out[(method, batch)] = cell
    return out


def methods_in(rows) -> list[str]:
    present = {row["method"] for row in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def batches_in(rows) -> list[int]:
    return sorted({row["batch_size"] for row in rows})


# -------------------------------------------------------------------- tables


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def difference_text(d: stats.PairedDifference | None) -> str:
    if d is None:
        return "—"
    if d.low is None:
        return f"{_signed(d.mean)} (n={d.n}, no interval)"
    return f"{_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}] (n={d.n})"


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
    markdown: str = ""


def build(rows: list[dict]) -> Report:
    best = best_settings(rows)
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
    report = Report(
        rows=rows,
        best=best,
        top1=top1,
        train_top1=table_cells(rows, "train_top1", best),
        gap=table_cells(rows, "generalization_gap", best),
        robust=table_cells(rows, "robust_top1", best),
        differences=differences,
        eps_cells={k: c for k, c in _cells(rows, "eval_top1").items() if k[0] == "conadv"},
        throughput=throughput,
        throughput_ratios=ratios,
    )
    report.markdown = markdown(report)
    return report


def _method_by_batch(report: Report, cells: dict, digits: int = 4) -> list[str]:
    batches = batches_in(report.rows)
    body = []
    for method in methods_in(report.rows):
        body.append(
            [METHOD_NAMES.get(method, method)]
            + [cells[(method, b)].text(digits) if (method, b) in cells else "—" for b in batches]
        )
    return _table(["method"] + [f"batch {b}" for b in batches], body)


def markdown(report: Report) -> str:
    rows = report.rows
    batches = batches_in(rows)
    swept = sorted({name for setting in report.best.values() for name, _ in setting})
    lines = [
        "# Sweep report",
        "",
        f"{len(rows)} finished runs. Cells are mean ± sample standard deviation over seeds "
        "(n seeds).",
        "",
        "## Top-1 by method and batch size (Table 1)",
        "",
        *_method_by_batch(report, report.top1),
        "",
    ]
    if swept:
        lines += [
            f"Where {' and '.join(swept)} were swept, each cell is the setting with the best "
            "mean top-1 (named in the cell), chosen on these same runs: optimistic.",
            "",
        ]
    lines += [
        "## ConAdv against the baselines, paired over seeds",
        "",
        "Mean of the per-seed difference of top-1 (same seed: same initial weights and "
        "data order) and its Student-t 95 % interval.",
        "",
    ]
    body = [
        [f"batch {b}"]
        + [
            difference_text(report.differences.get((b, name)))
            for name in ("conadv - vanilla", "conadv - disadv")
        ]
        for b in batches
    ]
    lines += _table(["", "ConAdv − vanilla", "ConAdv − DisAdv"], body) + [""]

    lines += ["## Generalization gap: train top-1 − test top-1 (Table 4)", ""]
    body = []
    for method in methods_in(rows):
        for b in batches:
            if (method, b) in report.gap:
                body.append(
                    [
                        METHOD_NAMES.get(method, method),
                        str(b),
                        report.train_top1[(method, b)].text(),
                        report.top1[(method, b)].text(),
                        report.gap[(method, b)].text(),
                    ]
                )
    lines += _table(["method", "batch", "train top-1", "test top-1", "gap"], body) + [""]

    if report.eps_cells:
        lines += ["## ConAdv top-1 by ε and batch size (Table 5)", ""]
        settings = sorted({k[2] for k in report.eps_cells}, key=str)
        body = []
        for setting in settings:
            label = ", ".join(f"{n}={v:g}" for n, v in setting) or "main.py's ε"
            cells = [report.eps_cells.get(("conadv", b, setting)) for b in batches]
            body.append([label] + [c.text() if c else "—" for c in cells])
        lines += _table(["setting"] + [f"batch {b}" for b in batches], body) + [""]

    lines += [
        "## Throughput: clean images per second (Table 3)",
        "",
        "Measured inside the training runs, one after another: for a controlled "
        "comparison use `python -m conadv.benchmark`, which interleaves the methods.",
        "",
        *_method_by_batch(report, report.throughput, digits=1),
        "",
    ]
    ratio_names = ("conadv / disadv", "conadv / vanilla")
    body = [
        [f"batch {b}"]
        + [
            f"{report.throughput_ratios[(b, n)]:.3f}" if (b, n) in report.throughput_ratios else "—"
            for n in ratio_names
        ]
        for b in batches
    ]
    lines += _table(["", "ConAdv / DisAdv", "ConAdv / vanilla"], body) + [""]

    if report.robust:
        lines += ["## Robust top-1 (evaluated under attack)", ""]
        lines += _method_by_batch(report, report.robust) + [""]
    return "\n".join(lines)
