"""A sweep's figures: accuracy and the train–test gap against batch, accuracy against ε,
and the training curves, as PNG files beside ``report.md`` (``conadv/studies/report.py``)."""

from __future__ import annotations

import glob
import os

from conadv.studies import plots
from conadv.studies import statistics as stats
from conadv.studies.cells import (
    METHOD_NAMES,
    batches_in,
    methods_in,
    varied_settings,
)
from conadv.studies.report import Report
from conadv.studies.sections import setting_of, setting_text
from conadv.studies.tuning import TUNING_NAMES


def _series(report: Report, cells: dict) -> dict:
    """method -> (batches, means, stds) of a method × batch table."""
    out = {}
    for method in methods_in(report.rows):
        points = [(b, cells[(method, b)]) for b in batches_in(report.rows) if (method, b) in cells]
        if points:
            out[method] = (
                [b for b, _ in points],
                [c.mean for _, c in points],
                [c.std or 0.0 for _, c in points],
            )
    return out


def eps_series(report: Report) -> dict:
    """One line of eval top-1 against ε per (method, batch, τ, source): "ConAdv, batch b,
    τ=1, separate" -> (ε, mean, std). A line joins runs that differ in ε alone; its label
    names the τ and source only where the report has several."""
    varied = varied_settings(report.rows)
    out = {}
    for (method, batch, setting), cell in sorted(report.setting_cells.items(), key=str):
        values = dict(setting)
        if "ε" not in values:
            continue
        shown = [
            str(values[n]) if n == "source" else setting_text(setting, [n])
            for n in varied
            if n != "ε" and (n in values or n in TUNING_NAMES)
        ]
        label = ", ".join([METHOD_NAMES.get(method, method), f"batch {batch}", *shown])
        xs, ys, es = out.setdefault(label, ([], [], []))
        xs.append(values["ε"])
        ys.append(cell.mean)
        es.append(cell.std or 0.0)
    for xs, ys, es in out.values():  # in ε order
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs[:], ys[:], es[:] = ([v[i] for i in order] for v in (xs, ys, es))
    return out


def lr_series(report: Report) -> dict:
    """batch -> method -> (learning rates, selection means, selection stds, test means,
    test stds), along the learning-rate multipliers at the method's chosen other settings
    (warmup, ε, τ, source), in rate order; a missing cell is NaN. A diverged setting
    (``tuning.Tuning.diverged``) is left out (``diverged_rates``)."""
    out = {}
    tuned = report.tuning
    for (method, batch, setting), (selection, test) in tuned.every.items():
        chosen = report.best.get((method, batch))
        if chosen is None or _without_lr(setting) != _without_lr(chosen):
            continue
        if (method, batch, setting) in tuned.diverged:
            continue
        rate = tuned.rates[(method, batch, setting)][0]
        points = out.setdefault(batch, {}).setdefault(method, [])
        points.append((rate, selection, test))
    for methods in out.values():
        for method, points in methods.items():
            points.sort(key=lambda point: point[0])
            methods[method] = (
                [rate for rate, _, _ in points],
                *_mean_std([selection for _, selection, _ in points]),
                *_mean_std([test for _, _, test in points]),
            )
    return out


def diverged_rates(report: Report) -> dict:
    """batch -> method -> the learning rates of its diverged settings (at its chosen other
    settings; at any, in a cell where every setting diverged), in rate order."""
    out = {}
    tuned = report.tuning
    for method, batch, setting in tuned.diverged:
        chosen = report.best.get((method, batch))
        if chosen is not None and _without_lr(setting) != _without_lr(chosen):
            continue
        rate = tuned.rates[(method, batch, setting)][0]
        out.setdefault(batch, {}).setdefault(method, []).append(rate)
    for methods in out.values():
        for rates in methods.values():
            rates.sort()
    return out


def _mean_std(cells: list) -> tuple[list[float], list[float]]:
    nan = float("nan")
    return (
        [cell.mean if cell else nan for cell in cells],
        [(cell.std or 0.0) if cell else nan for cell in cells],
    )


def _without_lr(setting: tuple) -> tuple:
    return tuple(item for item in setting if item[0] != "lr")


def read_scalars(directory: str, tag: str) -> dict[int, float]:
    """step -> value of a scalar in the TensorBoard event files of ``directory``."""
    import tensorflow as tf

    values = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def curve_series(report: Report, subdir: str, tag: str) -> dict:
    """ "method, batch b" -> (epochs, mean over seeds) of a logged scalar, at the steps
    every seed logged, for each method and batch's best setting."""
    out = {}
    for method in methods_in(report.rows):
        for batch in batches_in(report.rows):
            runs = [
                r
                for r in report.rows
                if not r.get("diverged")
                and r["method"] == method
                and r["batch_size"] == batch
                and setting_of(r) == report.best.get((method, batch))
            ]
            curves = [read_scalars(os.path.join(r["directory"], subdir), tag) for r in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            per_epoch = runs[0]["train_steps"] / runs[0]["epochs"] if runs[0]["epochs"] else 1
            out[f"{method}, batch {batch}"] = (
                [s / per_epoch for s in steps],
                [stats.mean([c[s] for c in curves]) for s in steps],
            )
    return out


def lr_figure(report: Report):
    """Selection (solid) and test (dashed) top-1 against the peak learning rate, log x,
    one line per method, one panel per batch size, mean ± std over seeds; a diverged
    setting's rate is an x at the bottom of its panel, off the lines."""
    from matplotlib.transforms import blended_transform_factory

    series, diverged = lr_series(report), diverged_rates(report)
    batches = sorted(set(series) | set(diverged))
    figure, panels = plots.new_figure(len(batches))
    for axes, batch in zip(panels, batches):
        for method in methods_in(report.rows):
            rates = diverged.get(batch, {}).get(method)
            if rates:
                axes.plot(
                    rates,
                    [0.02] * len(rates),
                    "x",
                    label=f"{METHOD_NAMES.get(method, method)} diverged",
                    color=plots.colour(method),
                    transform=blended_transform_factory(axes.transData, axes.transAxes),
                )
            if method not in series.get(batch, {}):
                continue
            rates, selection, selection_std, test, test_std = series[batch][method]
            name = METHOD_NAMES.get(method, method)
            for means, stds, style, what in (
                (selection, selection_std, "-", "selection"),
                (test, test_std, "--", "test"),
            ):
                axes.errorbar(
                    rates,
                    means,
                    yerr=stds,
                    label=f"{name} {what}",
                    marker="o",
                    capsize=3,
                    linestyle=style,
                    color=plots.colour(method),
                )
        swept = {x for line in series.get(batch, {}).values() for x in line[0]}
        swept |= {x for xs in diverged.get(batch, {}).values() for x in xs}
        rates = sorted(swept)
        axes.set_xscale("log")
        if rates:  # a tick at each swept rate, no minor labels over each other
            axes.set_xticks(rates, [f"{rate:.3g}" for rate in rates])
            axes.minorticks_off()
        axes.set_title(f"batch {batch}")
        axes.set_xlabel("peak learning rate")
        axes.set_ylabel("top-1 (selection solid, test dashed)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def plot_all(report: Report, out: str, prefix: str = "") -> dict:
    """Writes the PNGs (their names begin with ``prefix``); returns {file name: figure}."""
    figures = {}
    figure, (axes,) = plots.new_figure()
    plots.series_with_error_bars(
        axes, _series(report, report.top1), "global batch size", "eval top-1"
    )
    figures["accuracy_vs_batch.png"] = figure

    figure, (axes,) = plots.new_figure()
    plots.series_with_error_bars(
        axes, _series(report, report.gap), "global batch size", "train − test top-1"
    )
    figures["gap_vs_batch.png"] = figure

    figure, (axes,) = plots.new_figure()
    plots.series_with_error_bars(
        axes, eps_series(report), "attack ε (pixels)", "eval top-1", log2_x=False
    )
    figures["accuracy_vs_eps.png"] = figure

    figure, (loss_axes, top1_axes) = plots.new_figure(2)
    for axes, subdir, tag, label in (
        (loss_axes, "train", "loss/clean", "training loss (clean)"),
        (top1_axes, "eval", "top1/eval", "eval top-1"),
    ):
        styles = dict(zip(batches_in(report.rows), ("-", "--", ":", "-.") * 4))
        for name, (xs, ys) in curve_series(report, subdir, tag).items():
            method, batch = name.split(", batch ")
            axes.plot(xs, ys, label=name, color=plots.colour(method), linestyle=styles[int(batch)])
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    figures["training_curves.png"] = figure

    if report.tuning and "lr" in varied_settings(report.rows):
        figures["accuracy_vs_lr.png"] = lr_figure(report)

    for index, group in enumerate(report.sharpness):
        figure, (sharp_axes, gap_axes) = plots.new_figure(2)
        plots.series_with_error_bars(
            sharp_axes,
            _series(report, group.top_eigenvalue),
            "global batch size",
            "top Hessian eigenvalue",
        )
        sharp_axes.set_title(group.label(), fontsize="small")
        plots.series_with_error_bars(
            gap_axes, _series(report, report.gap), "global batch size", "train − test top-1"
        )
        suffix = f"_{index + 1}" if len(report.sharpness) > 1 else ""
        figures[f"sharpness_vs_batch{suffix}.png"] = figure

    figures = {prefix + name: figure for name, figure in figures.items()}
    for name, figure in figures.items():
        plots.save(figure, os.path.join(out, name))
    return figures
