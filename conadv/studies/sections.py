"""Which runs a sweep report compares: a section per configuration, one run per cell.

Runs are grouped by their own recorded configuration (``run.json``, written
once when the run was created): a section per configuration, named by what
sets it apart. A run whose configuration is part of a larger one — a vanilla
run has no attack flags, a ``clean_pass`` run no attack steps, start,
BatchNorm or target — stands in every section that contains it, so a
baseline serves every attack it is compared with, and the report of several
overlapping sweeps is the report of their union swept at once. Two runs that
would stand in one cell (section, method, batch, setting, seed) stop the
report with one line naming both: a cell is never one of them chosen
silently.
"""

from __future__ import annotations

import json

from conadv.run import run_identity


class ReportError(ValueError):
    """The runs under OUT cannot be reported without choosing among them; one line."""


def short(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


#: The tuning axes in a setting: (name, the run's record of its multiplier).
MULTIPLIERS = (("lr", "lr_multiplier"), ("warmup", "warmup_multiplier"))


def setting_of(row: dict) -> tuple:
    """The run's ε, τ and attack source, where its method has them, then its learning
    rate and warmup as the multipliers of the scaled ones (``grid.py``) where not 1.

    Within a configuration (one scaling rule, base rate and base batch) a multiplier
    is one learning rate at each batch, and the same multiplier lines up across batches.
    ×1 is left out, as in the run's name: a run of a sweep without the tuning axes
    (whose record has none) has the setting it always had."""
    out = []
    if row.get("attack_eps") is not None:
        out.append(("ε", row["attack_eps"]))
    if row.get("staleness") is not None:
        out.append(("τ", row["staleness"]))
    if row.get("attack_source") is not None:
        out.append(("source", row["attack_source"]))
    for name, key in MULTIPLIERS:
        if row.get(key) is not None and row[key] != 1:
            out.append((name, float(row[key])))
    return tuple(out)


def multiplier(setting: tuple, name: str) -> float:
    """The ``lr`` or ``warmup`` multiplier of a setting (1 where left out)."""
    return dict(setting).get(name, 1.0)


def setting_text(setting: tuple, names) -> str:
    """The named parts of a setting: "ε=4, lr×2" (a multiplier named even at ×1)."""
    values = dict(setting)
    tuning = dict(MULTIPLIERS)
    parts = []
    for name in names:
        if name in tuning:
            parts.append(f"{name}×{short(multiplier(setting, name))}")
        elif name in values:
            parts.append(f"{name}={short(values[name])}")
    return ", ".join(parts)


#: The flags a run's configuration lacks when its method does not use them
#: (``run_identity.relevant_values``): only their absence makes one configuration
#: part of a larger one.
OPTIONAL_FLAGS = frozenset(run_identity.ATTACK_FLAGS)

#: What every configuration recorded by this version holds (an older record lacks them).
IDENTITY_FLAGS = ("data_fingerprint", "replicas")


def part_of(smaller: dict, larger: dict) -> bool:
    """Every flag of ``smaller`` is in ``larger`` with the same value, and ``larger`` adds
    only flags a method may not use (a vanilla run's configuration is part of an
    attack's; one recorded without a data fingerprint is part of none)."""
    return set(larger) - set(smaller) <= OPTIONAL_FLAGS and all(
        name in larger and larger[name] == value for name, value in smaller.items()
    )


def _check_one_version(rows: list[dict]):
    """Runs recorded without a data fingerprint or replica count (by an older version)
    cannot be told apart from this version's by their data or devices: refused together."""
    new = [row for row in rows if all(name in row["config"] for name in IDENTITY_FLAGS)]
    if new and len(new) < len(rows):
        old = next(row for row in rows if row not in new)
        raise ReportError(
            f"{old['directory']} was recorded by an older version (its run.json has no data "
            f"fingerprint or replica count) beside runs that have them, such as "
            f"{new[0]['directory']}: move the older runs to a study of their own"
        )


def config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def configurations(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows of each configuration, with a title naming what sets it apart from the
    others ("" when there is one).

    The configurations are the recorded ones that are part of no larger one; a run
    stands in every configuration its own is part of. Raises ``ReportError`` naming
    both directories when two runs would stand in one cell.
    """
    _check_one_version(rows)
    configs = {config_key(row["config"]): row["config"] for row in rows}
    largest = [
        config
        for key, config in configs.items()
        if not any(k != key and part_of(config, other) for k, other in configs.items())
    ]
    data_dirs = {}
    for row in rows:
        if row.get("data_dir") and "data_fingerprint" in row["config"]:
            data_dirs.setdefault(row["config"]["data_fingerprint"], row["data_dir"])
    names = sorted({name for config in largest for name in config})
    # A flag some configurations lack (a vanilla-only section has no attack) names no
    # difference by its absence: two largest configurations differ in a value.
    differing = [n for n in names if len({config_key(c[n]) for c in largest if n in c}) > 1]
    sections = []
    for config in largest:
        group = [row for row in rows if part_of(row["config"], config)]
        title = ", ".join(
            _title_item(name, config[name], data_dirs) for name in differing if name in config
        )
        _check_one_run_per_cell(group, title)
        sections.append((title, group))
    titles = [title for title, _ in sections]
    if len(set(titles)) < len(titles):
        raise ReportError(
            "two configurations differ only in flags one of them lacks (runs recorded by "
            f"different versions?): {'; '.join(sorted(config_key(c) for c in largest))[:300]}"
        )
    return sorted(sections, key=lambda section: section[0])


def _title_item(name: str, value, data_dirs: dict) -> str:
    if name == "data_fingerprint" and value in data_dirs:
        return f"data={value} ({data_dirs[value]})"
    return f"{name}={short(value) if isinstance(value, float) else value}"


def _check_one_run_per_cell(rows: list[dict], title: str):
    cells = {}
    for row in rows:
        key = (row["method"], row["batch_size"], setting_of(row), row["seed"])
        if key in cells:
            where = f" of configuration {title}" if title else ""
            raise ReportError(
                f"{cells[key]} and {row['directory']} stand in one cell{where} "
                f"({row['method']}, batch {row['batch_size']}, seed {row['seed']}"
                + "".join(f", {n}={short(v)}" for n, v in setting_of(row))
                + "): move one of them out of the study's runs/"
            )
        cells[key] = row["directory"]
