"""A sweep's figures: accuracy and the train–test gap against batch, accuracy against ε,
and the training curves, as PNG files beside ``report.md`` (``conadv/studies/report.py``)."""

from __future__ import annotations

import glob
import os

from conadv.studies import plots
from conadv.studies import statistics as stats
from conadv.studies.report import (
    METHOD_NAMES,
    Report,
    batches_in,
    methods_in,
    varied_settings,
)
from conadv.studies.sections import setting_of, short


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
            f"τ={short(v)}" if n == "τ" else str(v) for n, v in setting if n != "ε" and n in varied
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
                if r["method"] == method
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
