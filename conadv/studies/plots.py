"""PNG figures of the studies and the throughput benchmark (matplotlib, no display).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``: no global state, no window, nothing that needs a display
on a cluster host. Each function returns the figure it saved, so a test can
read back the series it drew (``axes.lines``, ``axes.containers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: One colour per method, the same in every figure.
METHOD_COLOURS = {"vanilla": "tab:gray", "disadv": "tab:blue", "conadv": "tab:red"}


def new_figure(columns: int = 1, width: float = 5.0, height: float = 3.6):
    figure = Figure(figsize=(width * columns, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def colour(label: str) -> str | None:
    return METHOD_COLOURS.get(label.split("/")[0])


def log2_axis(axes, xs: Sequence[float]):
    """A base-2 logarithmic x axis with a tick at each value (batch sizes)."""
    axes.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    axes.set_xticks(ticks, [str(int(x)) if float(x).is_integer() else str(x) for x in ticks])
    axes.minorticks_off()


def series_with_error_bars(
    axes,
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    log2_x: bool = True,
):
    """One line per label through (x, mean) with ± std error bars."""
    xs_all = []
    for label, (xs, means, stds) in series.items():
        axes.errorbar(xs, means, yerr=stds, label=label, marker="o", capsize=3, color=colour(label))
        xs_all.extend(xs)
    if log2_x and xs_all:
        log2_axis(axes, xs_all)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend()


def save(figure, path: str):
    figure.savefig(path, dpi=100)
    return figure


def throughput(
    rates: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    ratio_series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str,
    title: str = "",
):
    """Images/s against the per-replica batch per method (left) and ratios (right)."""
    figure, (left, right) = new_figure(2)
    for label, (xs, ys) in rates.items():
        left.plot(xs, ys, marker="o", label=label, color=colour(label))
    for label, (xs, ys) in ratio_series.items():
        right.plot(xs, ys, marker="o", label=label)
    right.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    every_x = [x for xs, _ in rates.values() for x in xs]
    for axes, ylabel in ((left, "clean images / s"), (right, "ratio of images / s")):
        if every_x:
            log2_axis(axes, every_x)
        axes.set_xlabel("batch per replica")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    return save(figure, path)
