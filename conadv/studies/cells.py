"""A sweep report's cells: one metric of one (method, batch, setting) over seeds, kept
as seed → value so that any pairing of two cells is by seed (``report.py``)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from conadv.studies import statistics as stats
from conadv.studies.sections import MULTIPLIERS, multiplier, setting_of, setting_text

METHOD_ORDER = ("vanilla", "disadv", "conadv")
METHOD_NAMES = {"vanilla": "vanilla", "disadv": "DisAdv", "conadv": "ConAdv"}

#: Paired differences reported for each of these metrics (and top-1's, Table 1's).
DIFFERENCES = ("conadv - vanilla", "disadv - vanilla", "conadv - disadv")

#: Every name a setting may have, in the order a cell names them.
SETTING_NAMES = ("ε", "τ", "source", *(name for name, _ in MULTIPLIERS))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One metric of one configuration over seeds."""

    by_seed: dict  # seed -> value
    setting: tuple = ()  # (("ε", 4.0), ("τ", 1), ("source", "separate"), ("lr", 2.0))
    #: The setting's names the section varies (the others are shown nowhere in a cell).
    varied: tuple = ()

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
        chosen = setting_text(self.setting, self.varied)
        return f"{self.mean:.{digits}f}{spread} (n={self.n}{', ' + chosen if chosen else ''})"


def varied_settings(rows: list[dict]) -> tuple:
    """The names of the settings (ε, τ, source, lr, warmup) that take more than one value
    in rows (a learning-rate or warmup multiplier left out of a setting is 1)."""
    values = defaultdict(set)
    tuning = {name for name, _ in MULTIPLIERS}
    for row in rows:
        setting = setting_of(row)
        for name, value in setting:
            values[name].add(value)
        for name in tuning:
            values[name].add(multiplier(setting, name))
    return tuple(name for name in SETTING_NAMES if len(values[name]) > 1)


def metric_cells(rows: list[dict], metric: str, varied: tuple | None = None) -> dict:
    """(method, batch, setting) -> Cell of ``metric`` over seeds (seed -> value, so any
    pairing of two cells is by seed); ``varied``: the settings to show (rows' own)."""
    varied = varied_settings(rows) if varied is None else varied
    grouped = defaultdict(dict)
    for row in rows:
        if row.get(metric) is not None:
            key = (row["method"], row["batch_size"], setting_of(row))
            grouped[key][row["seed"]] = row[metric]
    return {key: Cell(by_seed, key[2], varied) for key, by_seed in grouped.items()}


def table_cells(rows: list[dict], metric: str, best: dict, varied: tuple | None = None) -> dict:
    """(method, batch) -> Cell of ``metric`` at that method and batch's chosen setting."""
    out = {}
    for (method, batch, setting), cell in metric_cells(rows, metric, varied).items():
        if best.get((method, batch)) == setting:
            out[(method, batch)] = cell
    return out


def methods_in(rows) -> list[str]:
    present = {row["method"] for row in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def batches_in(rows) -> list[int]:
    return sorted({row["batch_size"] for row in rows})
