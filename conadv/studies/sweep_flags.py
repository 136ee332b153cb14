"""The command line of ``conadv-experiments``: its commands, the sweep's own flags and
their checks; the flags after the sweep's own go to main.py (``experiments.py``)."""

from __future__ import annotations

import math

from absl import flags as absl_flags

import flags as main_flags
from conadv.studies import grid
from flags.method import ATTACK_SOURCES
from flags.validation import FlagError, distinct_numbers

COMMANDS = ("sweep", "report")


def define(fv: absl_flags.FlagValues):
    absl_flags.DEFINE_string("out", None, "The study's directory.", flag_values=fv)
    absl_flags.DEFINE_list(
        "methods", ["vanilla", "disadv", "conadv"], "Methods to train.", flag_values=fv
    )
    absl_flags.DEFINE_list(
        "batch_sizes", ["256"], "Global batch sizes (main.py --batch_size).", flag_values=fv
    )
    absl_flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (main.py --seed).", flag_values=fv)
    absl_flags.DEFINE_list(
        "attack_eps",
        None,
        "Attack budgets to sweep for DisAdv and ConAdv (default: main.py's --attack_eps, "
        "not swept).",
        flag_values=fv,
    )
    absl_flags.DEFINE_list(
        "staleness", None, "ConAdv τ values to sweep (default: main.py's).", flag_values=fv
    )
    absl_flags.DEFINE_list(
        "attack_source",
        None,
        "Attack sources to sweep for DisAdv and ConAdv: separate, clean_pass (default: "
        "main.py's --attack_source, not swept).",
        flag_values=fv,
    )
    absl_flags.DEFINE_list(
        "learning_rates",
        None,
        "Learning-rate multipliers to sweep, e.g. 0.5,1,2: multiples of the rate the "
        "--lr_scaling rule gives each batch (run rate = multiplier × main.py's "
        "--learning_rate × k), not rates. Default: not swept (1). Several need "
        "--selection_examples (the report chooses on held-out training data).",
        flag_values=fv,
    )
    absl_flags.DEFINE_list(
        "warmups",
        None,
        "Warmup multipliers to sweep: multiples of the scaled warmup (multiplier × "
        "main.py's --warmup_epochs × k), not epochs. Default: not swept (1). Several need "
        "--selection_examples.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "lr_scaling",
        "linear",
        list(grid.LR_SCALING),
        "How learning rate and warmup scale with the batch (conadv/studies/grid.py).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "base_batch_size",
        256,
        "The batch at which main.py's --learning_rate and --warmup_epochs hold.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer("parallel", 1, "Runs trained at once.", flag_values=fv)
    absl_flags.DEFINE_bool(
        "dry_run",
        False,
        "List the runs, their learning rates and lengths; train nothing.",
        flag_values=fv,
    )
    absl_flags.DEFINE_bool(
        "sharpness",
        False,
        "After each run, measure the sharpness of its weights (main.py --mode sharpness): "
        "the top Hessian eigenvalue and the ε-sharpness of the training loss, with the "
        "--sharpness_* flags given to the sweep (a run measured with others is measured again).",
        flag_values=fv,
    )


def require(condition: bool, message: str):
    if not condition:
        raise FlagError(message)


def parse(argv: list[str]):
    """(command, the sweep's flags, main.py's flags for the rest, the rest as given)."""
    if not argv or argv[0] not in COMMANDS:
        raise FlagError(
            f"the first argument must be one of {', '.join(COMMANDS)} "
            "(conadv-experiments sweep --out DIR ...)"
        )
    command, rest = argv[0], argv[1:]
    fv = absl_flags.FlagValues()
    define(fv)
    try:
        unparsed = fv(["experiments", *rest], known_only=True)[1:]
    except absl_flags.Error as error:
        raise FlagError(str(error).splitlines()[0]) from None
    require(bool(fv.out), "--out is required: the study's directory")
    if command == "report":
        if unparsed:
            raise FlagError(f"report takes only --out; {unparsed[0]} is not for it")
        return command, fv, None, []
    for name in fv.methods:
        require(name in ("vanilla", "disadv", "conadv"), f"--methods: {name!r} is unknown")
    distinct_numbers("batch_sizes", fv.batch_sizes, int)
    distinct_numbers("seeds", fv.seeds, int, positive=False)
    if fv.attack_eps:
        distinct_numbers("attack_eps", fv.attack_eps, float, positive=False)
    if fv.staleness:
        distinct_numbers("staleness", fv.staleness, int)
    for name in fv.attack_source or []:
        require(
            name in ATTACK_SOURCES,
            f"--attack_source: {name!r} is not one of {', '.join(ATTACK_SOURCES)}",
        )
    require(fv.base_batch_size > 0, "--base_batch_size must be positive")
    require(fv.parallel >= 1, "--parallel must be at least 1")
    main_fv = absl_flags.FlagValues()
    main_flags.define_all(main_fv)
    try:
        main_fv(["main.py", *unparsed])
    except absl_flags.Error as error:
        raise FlagError(
            f"{str(error).splitlines()[0]} (flags after the sweep's own go to main.py)"
        ) from None
    require_held_out_data(
        multipliers(fv.learning_rates, "learning_rates"),
        multipliers(fv.warmups, "warmups"),
        main_fv["selection_examples"].value if "selection_examples" in main_fv else None,
    )
    require(
        len(multipliers(fv.warmups, "warmups")) <= 1 or main_fv.warmup_epochs > 0,
        f"--warmups {','.join(fv.warmups or [])} multiply main.py's --warmup_epochs, which is 0: "
        "every multiple is the same run; give --warmup_epochs",
    )
    for name in grid.SWEEP_OWNED_FLAGS:
        require(
            not main_fv[name].present,
            f"--{name} is set by the sweep for each run; remove it"
            + (" (use --batch_sizes)" if name == "batch_size" else ""),
        )
    return command, fv, main_fv, unparsed


def multipliers(values, flag: str) -> list[float]:
    """A tuning axis's multipliers (``--learning_rates``, ``--warmups``); [1.0] if not
    given."""
    out = distinct_numbers(flag, values, float) if values else [1.0]
    for value in out:
        require(math.isfinite(value), f"--{flag}: {value} is not a finite multiplier")
    return out


def require_held_out_data(learning_rates, warmups, selection_examples):
    """Several learning rates or warmups are chosen among by the report, and only ever on
    held-out training data: refused without main.py's ``--selection_examples`` (absent,
    0 or None)."""
    require(
        (len(learning_rates) <= 1 and len(warmups) <= 1) or bool(selection_examples),
        "tuning needs held-out training data to choose on: add --selection_examples N "
        f"(--learning_rates {','.join(f'{m:g}' for m in learning_rates)}, --warmups "
        f"{','.join(f'{m:g}' for m in warmups)}; the report never chooses on the test set)",
    )
