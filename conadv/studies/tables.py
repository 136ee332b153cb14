"""A sweep report's Markdown: the paper's tables with spreads over seeds and paired
intervals (the numbers: ``conadv/studies/report.py``)."""

from __future__ import annotations

import dataclasses

from conadv.studies import statistics as stats
from conadv.studies import tuning
from conadv.studies.cells import (
    DIFFERENCES,
    METHOD_NAMES,
    SETTING_NAMES,
    batches_in,
    methods_in,
    varied_settings,
)
from conadv.studies.report import Report
from conadv.studies.sections import multiplier, setting_text


def difference_text(d: stats.PairedDifference | None) -> str:
    if d is None:
        return "—"
    if d.low is None:
        return f"{_signed(d.mean)} (n={d.n}, no interval)"
    return f"{_signed(d.mean)} [{_signed(d.low)}, {_signed(d.high)}] (n={d.n})"


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


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
    swept = list(varied_settings(rows))
    heading = f"# Sweep report: {report.title}" if report.title else "# Sweep report"
    lines = [
        heading,
        "",
        f"{_runs_text(rows)}. Cells are mean ± sample standard deviation over seeds "
        "(n seeds, a diverged run's not among them).",
        "",
        "## Top-1 by method and batch size (Table 1)",
        "",
        *_method_by_batch(report, report.top1),
        "",
    ]
    chosen_on = set(report.tuning.chosen_on.values()) if report.tuning else {tuning.ON_TEST}
    if swept and tuning.ON_TEST in chosen_on:
        lines += [
            f"Where {' and '.join(swept)} {'were' if len(swept) > 1 else 'was'} swept, each "
            "cell is the setting with the best "
            "mean top-1 (named in the cell), chosen on these same runs: optimistic"
            + (" (the cells without selection numbers)." if len(chosen_on) > 1 else "."),
            "",
        ]
    if report.tuning:
        lines += tuned_section(report)
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
            label = setting_text(setting, ["ε", *(n for n in swept if n != "ε")])
            cells = [report.eps_cells.get(("conadv", b, setting)) for b in batches]
            body.append([label] + [c.text() if c else "—" for c in cells])
        lines += _table(["setting"] + [f"batch {b}" for b in batches], body) + [""]

    lines += [
        "## Throughput: clean images per second (Table 3)",
        "",
        "Measured inside the training runs, one after another: for a controlled "
        "comparison use `conadv-benchmark`, which interleaves the methods.",
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

    gap_body = [
        ["generalization_gap", f"batch {b}"]
        + [
            difference_text(report.metric_differences.get(("generalization_gap", b, n)))
            for n in DIFFERENCES
        ]
        for b in batches
    ]
    lines += [
        "## Generalization gap, paired over seeds",
        "",
        *_table(["metric", "", *DIFFERENCES], gap_body),
        "",
    ]
    for group in report.sharpness:
        lines += [
            f"## Sharpness of the trained weights ({group.label()})",
            "",
            "The top eigenvalue of the Hessian of the training loss and Keskar et al.'s "
            "ε-sharpness (`sharpness.json`, `main.py --mode sharpness`), measured with "
            f"{group.label()}, then their paired differences (same seed, each method at its "
            "chosen setting).",
            "",
            "Top Hessian eigenvalue:",
            "",
            *_method_by_batch(report, group.top_eigenvalue, digits=3),
            "",
            "ε-sharpness:",
            "",
            *_method_by_batch(report, group.eps_sharpness, digits=3),
            "",
        ]
        body = [
            [metric, f"batch {b}"]
            + [difference_text(group.differences.get((metric, b, n))) for n in DIFFERENCES]
            for metric in ("top_eigenvalue", "eps_sharpness")
            for b in batches
        ]
        lines += _table(["metric", "", *DIFFERENCES], body) + [""]

    if report.source_differences:
        lines += [
            "## The free attack against the separate attack, paired over seeds",
            "",
            "Eval top-1 with `--attack_source separate` and `clean_pass`, and the mean of "
            "the per-seed difference clean_pass − separate with its Student-t 95 % interval.",
            "",
        ]
        body = []
        for (method, batch, rest), (separate, free, difference) in sorted(
            report.source_differences.items(), key=lambda item: str(item[0])
        ):
            label = setting_text(rest, [n for n in swept if n != "source"])
            body.append(
                [METHOD_NAMES.get(method, method) + (f" ({label})" if label else ""), str(batch)]
                + [separate.text(), free.text(), difference_text(difference)]
            )
        header = ["method", "batch", "separate", "clean_pass", "clean_pass − separate"]
        lines += _table(header, body) + [""]

    if report.robust:
        lines += ["## Robust top-1 (evaluated under attack)", ""]
        lines += _method_by_batch(report, report.robust) + [""]
    return "\n".join(lines)


def _runs_text(rows: list[dict]) -> str:
    """ "12 finished runs" or "11 finished runs and 1 diverged (no metrics)"."""
    diverged = sum(bool(row.get(tuning.DIVERGED)) for row in rows)
    text = f"{len(rows) - diverged} finished runs"
    return text + (f" and {diverged} diverged (no metrics)" if diverged else "")


def _difference_name(name: str) -> str:
    """ "conadv - vanilla" → "ConAdv − vanilla"."""
    return " − ".join(METHOD_NAMES.get(m, m) for m in name.split(" - "))


def _plain(cell) -> str:
    """A cell without its setting (named in a column of its own); "—" for none."""
    return "—" if cell is None else dataclasses.replace(cell, varied=()).text()


def _setting_order(rows, method, batch, setting) -> tuple:
    """Method, batch, the other settings, then the learning rate and warmup multipliers."""
    others = str(tuple(item for item in setting if item[0] not in tuning.TUNING_NAMES))
    multipliers = tuple(multiplier(setting, name) for name in tuning.TUNING_NAMES)
    return (methods_in(rows).index(method), batch, others, multipliers)


def _number(value) -> str:
    return "—" if value is None else f"{value:.4g}"


def tuned_section(report: Report) -> list[str]:
    """Each method at its own chosen setting: how many settings each cell tried, the
    chosen setting's selection, test and train top-1, gap and sharpness, the paired
    differences at the chosen settings, and every setting's selection and test top-1."""
    tuned = report.tuning
    rows = report.rows
    varied = set(varied_settings(rows)) | set(tuning.TUNING_NAMES)
    names = [n for n in SETTING_NAMES if n in varied]
    lines = [
        "## Tuned comparison: each method at its own chosen setting",
        "",
        *(f"{line}." for line in tuned.counts),
        "",
    ]
    if tuned.no_choice:
        lines += [*(f"{line}." for line in tuned.no_choice), ""]
    if tuning.ON_SELECTION in tuned.chosen_on.values():
        lines += [
            "A cell's setting is the one of best mean selection top-1 over seeds: top-1 on "
            "training examples held out of training (main.py `--selection_examples`), never "
            "on the test set, so the test top-1 at the chosen setting is not optimistic.",
            "",
        ]
    groups = report.sharpness
    sharpness_header = []
    for index in range(len(groups)):
        suffix = f" [{index + 1}]" if len(groups) > 1 else ""
        sharpness_header += [f"top eigenvalue{suffix}", f"ε-sharpness{suffix}"]
    body = []
    for method in methods_in(rows):
        for batch in batches_in(rows):
            setting = report.best.get((method, batch))
            if setting is None:
                continue
            rate, warmup = tuned.rates.get((method, batch, setting), (None, None))
            cells = [
                tuned.selection.get((method, batch)),
                report.top1.get((method, batch)),
                report.train_top1.get((method, batch)),
                report.gap.get((method, batch)),
            ]
            for group in groups:
                cells += [
                    group.top_eigenvalue.get((method, batch)),
                    group.eps_sharpness.get((method, batch)),
                ]
            body.append(
                [METHOD_NAMES.get(method, method), str(batch), setting_text(setting, names)]
                + [_number(rate), _number(warmup)]
                + [_plain(cell) for cell in cells]
            )
    header = ["method", "batch", "setting", "learning rate", "warmup (epochs)"]
    header += ["selection top-1", "test top-1", "train top-1", "gap", *sharpness_header]
    lines += _table(header, body) + [""]
    if len(groups) > 1:
        lines += [f"[{i + 1}]: {g.label()}" for i, g in enumerate(groups)] + [""]
    lines += [
        "Test top-1, each method at its own chosen setting, paired by seed (same initial "
        "weights and data order, whatever the methods' learning rates): mean of the "
        "per-seed difference and its Student-t 95 % interval.",
        "",
    ]
    body = [
        [f"batch {b}"] + [difference_text(tuned.differences.get((b, n))) for n in DIFFERENCES]
        for b in batches_in(rows)
    ]
    header = ["", *(_difference_name(name) for name in DIFFERENCES)]
    lines += _table(header, body) + [""]
    lines += [
        "Every setting's mean selection and test top-1 (✓: the chosen one; a setting that "
        "diverged on any seed is out, never chosen):",
        "",
    ]
    body = []
    for (method, batch, setting), (selection, test) in sorted(
        tuned.every.items(), key=lambda item: _setting_order(rows, *item[0])
    ):
        rate, warmup = tuned.rates.get((method, batch, setting), (None, None))
        numbers = [_plain(selection), _plain(test)]
        if (method, batch, setting) in tuned.diverged:
            k, n = tuned.diverged[(method, batch, setting)]
            numbers = [f"diverged ({k} of {n} seeds)", "—"]
        body.append(
            [METHOD_NAMES.get(method, method), str(batch), setting_text(setting, names)]
            + [_number(rate), _number(warmup)]
            + numbers
            + ["✓" if report.best.get((method, batch)) == setting else ""]
        )
    header = ["method", "batch", "setting", "learning rate", "warmup (epochs)"]
    lines += _table(header + ["selection top-1", "test top-1", "chosen"], body) + [""]
    return lines
