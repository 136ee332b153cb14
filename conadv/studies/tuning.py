"""Choosing each (method, batch)'s setting, and the comparison of methods tuned alike.

A comparison of methods is fair only if each runs at its own best learning
rate, and that rate must be chosen on data that is not the test set: main.py's
``--selection_examples`` holds a fixed, stratified part of the *training* set
out of training (the same for every method and seed) and evaluates each
finished run on it (``summary.json``: ``selection_top1``). Where every run of
a (method, batch) cell has that number, the cell's setting (learning-rate and
warmup multiplier, ε, τ, source) is the one of best mean selection top-1 over
the seeds every setting of the cell has (ties: the first setting in sorted
order), and its test top-1 is read
only afterwards: the choice is made on held-out training data, so the test
numbers at the chosen settings are not optimistic.

A cell without selection numbers keeps the older rule for ε, τ and the attack
source (best mean *test* top-1, which the report marks optimistic), but several
learning rates or warmups are never chosen among on the test set: such a cell
stops the report with a one-line ``ReportError`` (train with
``--selection_examples``).

The paired differences between methods take each method at its own chosen
setting and pair them by seed (seed → value, over the seeds both have), even
where the methods' chosen learning rates differ (``statistics.paired_difference``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from conadv.studies import statistics as stats
from conadv.studies.cells import (
    DIFFERENCES,
    METHOD_NAMES,
    batches_in,
    methods_in,
    metric_cells,
    table_cells,
    varied_settings,
)
from conadv.studies.sections import MULTIPLIERS, ReportError, multiplier, setting_of, short

SELECTION = "selection_top1"
TUNING_NAMES = tuple(name for name, _ in MULTIPLIERS)  # ("lr", "warmup")

#: How a cell's setting was chosen.
ON_SELECTION, ON_TEST, ONLY_ONE = "selection", "test", "only"


def _cells_by_key(rows: list[dict]) -> dict:
    grouped = defaultdict(list)
    for row in rows:
        grouped[(row["method"], row["batch_size"])].append(row)
    return grouped


def _best(settings: list[tuple], cells: dict, key) -> tuple | None:
    """The setting of the highest mean; ties go to the first of ``settings``."""
    best, score = None, None
    for setting in settings:
        cell = cells.get((*key, setting))
        if cell is not None and (score is None or cell.mean > score):
            best, score = setting, cell.mean
    return best


def common_seeds(cell_rows: list[dict]) -> list[dict]:
    """The runs of the seeds every setting of the cell has: settings are compared over
    the same seeds (a partial sweep, or a setting whose seed failed, would otherwise be
    judged on other initial weights and data orders than the rest). Raises
    ``ReportError`` if no seed is common to all."""
    seeds = defaultdict(set)
    for row in cell_rows:
        seeds[setting_of(row)].add(row["seed"])
    common = set.intersection(*seeds.values())
    if not common:
        row = cell_rows[0]
        raise ReportError(
            f"{METHOD_NAMES.get(row['method'], row['method'])} at batch {row['batch_size']}: "
            "no seed has finished at every setting, so the settings cannot be compared "
            "on the same seeds; finish the sweep (run the same command again)"
        )
    return [row for row in cell_rows if row["seed"] in common]


def choose(rows: list[dict]) -> tuple[dict, dict]:
    """((method, batch) -> chosen setting, (method, batch) -> how it was chosen:
    ``ON_SELECTION``, ``ON_TEST`` or ``ONLY_ONE``). Raises ``ReportError`` for a cell
    of several learning rates or warmups without selection numbers."""
    best, how = {}, {}
    for key, cell_rows in sorted(_cells_by_key(rows).items(), key=lambda item: str(item[0])):
        settings = sorted({setting_of(row) for row in cell_rows}, key=str)
        if len(settings) == 1:
            best[key], how[key] = settings[0], ONLY_ONE
            continue
        if all(row.get(SELECTION) is not None for row in cell_rows):
            chosen = _best(settings, metric_cells(common_seeds(cell_rows), SELECTION), key)
            best[key], how[key] = chosen, ON_SELECTION
            continue
        tuned = [n for n in TUNING_NAMES if len({multiplier(s, n) for s in settings}) > 1]
        if tuned:
            missing = next(row for row in cell_rows if row.get(SELECTION) is None)
            method, batch = key
            raise ReportError(
                f"{METHOD_NAMES.get(method, method)} at batch {batch} has several "
                f"{' and '.join(tuned)} multipliers but {missing.get('directory', 'a run')} has no "
                "selection top-1: the report never chooses a learning rate or warmup on the "
                "test set; train the sweep with main.py's --selection_examples N"
            )
        chosen = _best(settings, metric_cells(cell_rows, "eval_top1"), key)
        if chosen is not None:
            best[key], how[key] = chosen, ON_TEST
    return best, how


@dataclasses.dataclass
class Tuning:
    """The tuned comparison's numbers (the test, train and gap cells at the chosen
    settings are the report's own ``top1``, ``train_top1`` and ``gap``)."""

    chosen_on: dict  # (method, batch) -> ON_SELECTION | ON_TEST | ONLY_ONE
    selection: dict  # (method, batch) -> Cell of selection top-1 at the chosen setting
    #: (method, batch, setting) -> (selection Cell | None, test Cell | None), every setting
    every: dict
    #: (method, batch, setting) -> (peak learning rate, warmup epochs) of its runs
    rates: dict
    #: (batch, "conadv - vanilla") -> PairedDifference of test top-1, each method at its
    #: own chosen setting, paired by seed
    differences: dict
    counts: list  # the lines saying how many settings each cell tried
    examples: tuple  # the held-out training examples' counts (summary.json)


def is_tuned(rows: list[dict]) -> bool:
    """Whether the report has a tuned comparison: selection numbers, or several learning
    rates or warmups."""
    varied = varied_settings(rows)
    return any(row.get(SELECTION) is not None for row in rows) or any(
        name in varied for name in TUNING_NAMES
    )


def build(rows: list[dict], best: dict, chosen_on: dict, test: dict) -> Tuning:
    """The tuned numbers; ``test``: (method, batch) -> Cell of test top-1 at ``best``."""
    selection_cells = metric_cells(rows, SELECTION)
    test_cells = metric_cells(rows, "eval_top1")
    every = {
        key: (selection_cells.get(key), test_cells.get(key))
        for key in sorted(set(selection_cells) | set(test_cells), key=str)
    }
    rates = {}
    for row in rows:
        key = (row["method"], row["batch_size"], setting_of(row))
        rates.setdefault(key, (row.get("learning_rate"), row.get("warmup_epochs")))
    differences = {}
    for batch in batches_in(rows):
        for name in DIFFERENCES:
            first, second = name.split(" - ")
            if (first, batch) in test and (second, batch) in test:
                differences[(batch, name)] = stats.paired_difference(
                    test[(first, batch)].by_seed, test[(second, batch)].by_seed
                )
    examples = tuple(
        sorted({row["selection_examples"] for row in rows if row.get("selection_examples")})
    )
    return Tuning(
        chosen_on=chosen_on,
        selection=table_cells(rows, SELECTION, best),
        every=every,
        rates=rates,
        differences=differences,
        counts=count_lines(rows, chosen_on, examples),
        examples=examples,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cells_named(keys: list, rows: list[dict]) -> str:
    """ "vanilla, ConAdv at batch 256": a method alone where all its batches are in keys."""
    parts = []
    for method in methods_in(rows):
        batches = sorted(b for m, b in keys if m == method)
        if not batches:
            continue
        every = sorted({row["batch_size"] for row in rows if row["method"] == method})
        name = METHOD_NAMES.get(method, method)
        at = ", ".join(str(b) for b in batches)
        parts.append(name if batches == every else f"{name} at batch {at}")
    return "; ".join(parts)


def count_lines(rows: list[dict], chosen_on: dict, examples: tuple) -> list[str]:
    """How many settings each (method, batch) cell tried and what chose among them, a
    line per distinct count ("3 learning rates × 1 warmup = 3 settings per (method, batch)
    cell, chosen on 500 held-out training examples by mean selection top-1 over seeds")."""
    groups = defaultdict(list)
    for key, cell_rows in _cells_by_key(rows).items():
        settings = {setting_of(row) for row in cell_rows}
        others = {tuple(i for i in s if i[0] not in TUNING_NAMES) for s in settings}
        other_names = sorted({name for s in others for name, _ in s}, key=str)
        counts = tuple(len({multiplier(s, n) for s in settings}) for n in TUNING_NAMES)
        names = tuple(other_names) if len(others) > 1 else ()
        what = (*counts, len(others), names, len(settings), chosen_on.get(key))
        groups[what].append(key)
    held_out = " or ".join(short(n) for n in examples) or "the"
    lines = []
    for (lrs, warmups, others, names, total, how), keys in sorted(groups.items(), key=str):
        text = f"{_plural(lrs, 'learning rate')} × {_plural(warmups, 'warmup')}"
        if others > 1:
            text += f" × {others} other settings ({', '.join(names)})"
        text += f" = {_plural(total, 'setting')} per (method, batch) cell"
        if how == ON_SELECTION:
            text += (
                f", chosen on {held_out} held-out training examples by mean selection "
                "top-1 over seeds"
            )
        elif how == ON_TEST:
            text += ", chosen by mean test top-1 over seeds (no selection numbers): optimistic"
        if len(groups) > 1:
            text = f"{_cells_named(keys, rows)}: {text}"
        lines.append(text)
    return lines
