"""Choosing each (method, batch)'s setting, and the comparison of methods tuned alike.

A comparison of methods is fair only if each runs at its own best learning
rate, and that rate must be chosen on data that is not the test set: main.py's
``--selection_examples`` holds a fixed, stratified part of the *training* set
out of training (the same for every method and seed) and evaluates each
finished run on it (``summary.json``: ``selection_top1``). Where every run of
a (method, batch) cell has that number, the cell's setting (learning-rate and
warmup multiplier, ε, τ, source) is the one of best mean selection top-1 over
the seeds every setting of the cell has (ties: the first in the settings'
natural order, ×2 before ×10; a mean that is not a number never wins), and
its test top-1 is read
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

A diverged run (its loss went non-finite: ``diverged.json``, no metrics) is a
result of its setting, not a missing seed: a seed counts as had by a setting
whether its run finished or diverged, and a setting with a diverged run at any
seed (also one the other settings lack) is out — never chosen, never scored,
and shown as "diverged (k of n seeds)" in the table of every setting. The
others are compared over those same seeds as above. A cell whose every setting
is out has no chosen setting (its cells stay empty) and the
tuned section says so in one line (``no_choice_lines``).
"""

from __future__ import annotations

import dataclasses
import math
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
from conadv.studies.sections import (
    MULTIPLIERS,
    ReportError,
    multiplier,
    setting_of,
    setting_text,
    short,
)

SELECTION = "selection_top1"
DIVERGED = "diverged"
TUNING_NAMES = tuple(name for name, _ in MULTIPLIERS)  # ("lr", "warmup")

#: How a cell's setting was chosen.
ON_SELECTION, ON_TEST, ONLY_ONE = "selection", "test", "only"


def _cells_by_key(rows: list[dict]) -> dict:
    grouped = defaultdict(list)
    for row in rows:
        grouped[(row["method"], row["batch_size"])].append(row)
    return grouped


def _best(settings: list[tuple], cells: dict, key) -> tuple | None:
    """The setting of the highest mean; ties go to the first of ``settings``; a mean that
    is not a number never wins."""
    best, score = None, None
    for setting in settings:
        cell = cells.get((*key, setting))
        if cell is None or not math.isfinite(cell.mean):
            continue
        if score is None or cell.mean > score:
            best, score = setting, cell.mean
    return best


def in_order(settings) -> list[tuple]:
    """Settings in their natural order: by ε, τ and source, then by the learning-rate and
    warmup multipliers as numbers (×0.5 before ×1 before ×2 before ×10; ×1, left out of
    a setting, counts as 1). A name's values are all numbers or all strings."""

    def key(setting):
        others = tuple(item for item in setting if item[0] not in TUNING_NAMES)
        return others, tuple(multiplier(setting, name) for name in TUNING_NAMES)

    try:
        return sorted(settings, key=key)
    except TypeError:
        return sorted(settings, key=lambda setting: (str(key(setting)[0]), key(setting)[1]))


def common_seeds(cell_rows: list[dict]) -> list[dict]:
    """The runs of the seeds every setting of the cell has (finished or diverged): settings
    are compared over the same seeds (a partial sweep, or a setting whose seed failed,
    would otherwise be judged on other initial weights and data orders than the rest).
    Raises ``ReportError`` if no seed is common to all."""
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


def _on_selection(cell_rows: list[dict]) -> bool:
    """Whether the cell's settings are chosen among on selection top-1: several, and
    every finished run has it."""
    finished = [row for row in cell_rows if not row.get(DIVERGED)]
    return len({setting_of(row) for row in cell_rows}) > 1 and all(
        row.get(SELECTION) is not None for row in finished
    )


def diverged_settings(cell_rows: list[dict]) -> dict:
    """setting -> (k, n) for each setting of one (method, batch) cell that is out: k of
    its n runs diverged, at any seed (also one the other settings lack: its finished
    seeds alone would make it look better than it is)."""
    counts = defaultdict(lambda: [0, 0])
    for row in cell_rows:
        count = counts[setting_of(row)]
        count[0] += bool(row.get(DIVERGED))
        count[1] += 1
    return {setting: (k, n) for setting, (k, n) in counts.items() if k}


def choose(rows: list[dict]) -> tuple[dict, dict]:
    """((method, batch) -> chosen setting, (method, batch) -> how it was (or would have
    been) chosen: ``ON_SELECTION``, ``ON_TEST`` or ``ONLY_ONE``). A cell whose every
    setting diverged (``diverged_settings``) is in the second alone. Raises
    ``ReportError`` for a cell of several learning rates or warmups without selection
    numbers."""
    best, how = {}, {}
    for key, cell_rows in sorted(_cells_by_key(rows).items(), key=lambda item: str(item[0])):
        settings = in_order({setting_of(row) for row in cell_rows})
        if len(settings) == 1:
            how[key] = ONLY_ONE
            if not diverged_settings(cell_rows):
                best[key] = settings[0]
            continue
        if _on_selection(cell_rows):
            compared = common_seeds(cell_rows)  # diverged runs included: they are results
            left = [s for s in settings if s not in diverged_settings(cell_rows)]
            how[key] = ON_SELECTION
            chosen = _best(left, metric_cells(compared, SELECTION), key)
            if chosen is not None:
                best[key] = chosen
            continue
        tuned = [n for n in TUNING_NAMES if len({multiplier(s, n) for s in settings}) > 1]
        if tuned:
            missing = next(
                row for row in cell_rows if row.get(SELECTION) is None and not row.get(DIVERGED)
            )
            method, batch = key
            raise ReportError(
                f"{METHOD_NAMES.get(method, method)} at batch {batch} has several "
                f"{' and '.join(tuned)} multipliers but {missing.get('directory', 'a run')} has no "
                "selection top-1: the report never chooses a learning rate or warmup on the "
                "test set; train the sweep with main.py's --selection_examples N"
            )
        left = [s for s in settings if s not in diverged_settings(cell_rows)]
        how[key] = ON_TEST
        chosen = _best(left, metric_cells(cell_rows, "eval_top1"), key)
        if chosen is not None:
            best[key] = chosen
    return best, how


def _order(setting: tuple) -> tuple:
    """The other settings, then the learning rate and warmup multipliers (as numbers)."""
    others = str(tuple(item for item in setting if item[0] not in TUNING_NAMES))
    return (others, tuple(multiplier(setting, name) for name in TUNING_NAMES))


def no_choice_lines(rows: list[dict], best: dict) -> list[str]:
    """A line for each (method, batch) cell without a chosen setting because every
    setting diverged: "vanilla at batch 64: no setting chosen: every setting diverged
    (lr×1: 1 of 3 seeds; lr×2: 3 of 3 seeds)"."""
    names = varied_settings(rows)
    lines = []
    for key, cell_rows in sorted(_cells_by_key(rows).items(), key=lambda item: str(item[0])):
        out = diverged_settings(cell_rows)
        if key in best:
            continue
        method, batch = key
        if len(out) < len({setting_of(row) for row in cell_rows}):
            lines.append(
                f"{METHOD_NAMES.get(method, method)} at batch {batch}: no setting chosen, no "
                "setting that did not diverge has a mean that is a number"
            )
            continue
        counts = "; ".join(
            f"{setting_text(setting, names) or 'its only setting'}: {k} of {n} seeds"
            for setting, (k, n) in sorted(out.items(), key=lambda item: _order(item[0]))
        )
        lines.append(
            f"{METHOD_NAMES.get(method, method)} at batch {batch}: no setting chosen, every "
            f"setting diverged ({counts})"
        )
    return lines


@dataclasses.dataclass
class Tuning:
    """The tuned comparison's numbers (the test, train and gap cells at the chosen
    settings are the report's own ``top1``, ``train_top1`` and ``gap``)."""

    chosen_on: dict  # (method, batch) -> ON_SELECTION | ON_TEST | ONLY_ONE
    selection: dict  # (method, batch) -> Cell of selection top-1 at the chosen setting
    #: (method, batch, setting) -> (selection Cell | None, test Cell | None), every setting
    #: (a diverged one's: None, None)
    every: dict
    #: (method, batch, setting) -> (k, n): the settings out, k of n compared seeds diverged
    diverged: dict
    #: (method, batch, setting) -> (peak learning rate, warmup epochs) of its runs
    rates: dict
    #: (batch, "conadv - vanilla") -> PairedDifference of test top-1, each method at its
    #: own chosen setting, paired by seed
    differences: dict
    counts: list  # the lines saying how many settings each cell tried
    examples: tuple  # the held-out training examples' counts (summary.json)
    no_choice: list  # a line per cell whose every setting diverged (``no_choice_lines``)


def is_tuned(rows: list[dict]) -> bool:
    """Whether the report has a tuned comparison: selection numbers, or several learning
    rates or warmups."""
    varied = varied_settings(rows)
    return (
        any(row.get(SELECTION) is not None for row in rows)
        or any(name in varied for name in TUNING_NAMES)
        or any(row.get(DIVERGED) for row in rows)
    )


def build(rows: list[dict], best: dict, chosen_on: dict, test: dict) -> Tuning:
    """The tuned numbers; ``test``: (method, batch) -> Cell of test top-1 at ``best``."""
    selection_cells = metric_cells(rows, SELECTION)
    test_cells = metric_cells(rows, "eval_top1")
    diverged = {
        (*key, setting): count
        for key, cell_rows in _cells_by_key(rows).items()
        for setting, count in diverged_settings(cell_rows).items()
    }
    every = {
        key: (None, None) if key in diverged else (selection_cells.get(key), test_cells.get(key))
        for key in sorted(set(selection_cells) | set(test_cells) | set(diverged), key=str)
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
        diverged=diverged,
        rates=rates,
        differences=differences,
        counts=count_lines(rows, chosen_on, examples),
        examples=examples,
        no_choice=no_choice_lines(rows, best),
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
