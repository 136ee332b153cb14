"""The runs of a sweep: the cross product of methods, batch sizes, seeds, ε, τ, attack
sources, learning-rate multipliers and warmup multipliers.

Learning-rate scaling (``--lr_scaling``), from ``--base_batch_size`` b₀ and
main.py's ``--learning_rate`` η₀ and ``--warmup_epochs`` w₀ (given after the
sweep's own flags, or their defaults): at global batch b the factor is
k = b / b₀ (``linear``; Goyal et al. 2017), k = √(b / b₀) (``sqrt``; Krizhevsky
2014, Hoffer et al. 2017) or k = 1 (``none``). The run gets peak learning rate
η₀·k and warmup w₀·k epochs: a larger peak gets a longer ramp (with
``linear`` the warmup then lasts the same number of steps at every batch).
The training length is main.py's, in epochs unless ``--train_steps`` is
given, so every batch size sees the same number of images by default.

Tuning axes (``--learning_rates``, ``--warmups``): multiples of the *scaled*
values, not rates. A multiplier m of ``--learning_rates`` gives the run peak
learning rate m·η₀·k, one of ``--warmups`` a warmup of m·w₀·k epochs; the
default is [1] (not swept), the rule's own value. So the same multiplier means
the same place relative to the scaling rule at every batch size, and the
report compares a method's rates at one batch by their multipliers.

A run is everything that changes its numbers: its directory name ends in a
hash of every main.py flag that defines it (main.py's run identity,
``conadv/run/run_identity.py``, less the flags its method does not use), of
those that change what it reports (``RESULT_FLAGS``: its length, its
evaluation), of the sweep's scaling rule, of the replica count and of its
data's fingerprint (the data's content, not its path:
``DataSource.fingerprint``). So a sweep started again with another
``--lr_scaling``, main.py flag, device count or data set trains new runs
beside the old ones instead of taking the old ones for its own, while the
same data moved to another bucket is the same run. The directory name spells
the run's grid point in full (ε and source for DisAdv and ConAdv, τ for
ConAdv, whether the sweep varied them or not), so every sweep that contains a
run names it alike; a learning-rate or warmup multiplier other than 1 is spelled
too (``_lrx2``, ``_wux0.5``) and ×1 is left out, so a run at the scaled values keeps
the name it has in a sweep without the tuning axes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from conadv import steps as steps_lib

LR_SCALING = ("linear", "sqrt", "none")

#: main.py flags the sweep sets itself, per run.
SWEEP_OWNED_FLAGS = ("method", "batch_size", "seed", "model_dir")

#: main.py flags that are not part of a run's identity for main.py (a run may be extended
#: or evaluated otherwise) but change what a sweep reports: a sweep's run includes them.
RESULT_FLAGS = (
    "train_steps",
    "train_epochs",
    "precise_bn_batches",
    "eval_attack_eps",
    "eval_attack_steps",
    "eval_attack_step_size",
    "skip_corrupt_records",
)

#: What varies inside one sweep by design (its axes, and the learning rate and warmup
#: its scaling rule gives each batch); everything else of a run's identity is its
#: configuration (the report's sections).
GRID_FLAGS = (
    "method",
    "batch_size",
    "seed",
    "attack_eps",
    "staleness",
    "attack_source",
    "learning_rate",
    "warmup_epochs",
)


def scale_factor(rule: str, batch_size: int, base_batch_size: int) -> float:
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ValueError(f"--lr_scaling={rule} is not one of {', '.join(LR_SCALING)}")


def _number(value: float) -> str:
    """A short, file-name-safe spelling of a number (4.0 → 4, 0.5 → 0.5)."""
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: its grid point and the flags it is trained with."""

    method: str
    batch_size: int
    seed: int
    attack_eps: float | None  # None: vanilla (it makes no adversarial examples)
    staleness: int | None  # None: not ConAdv
    learning_rate: float
    warmup_epochs: float
    #: A hash of the run's whole identity (``experiments.plan``); "" until known.
    identity: str = ""
    #: The run's configuration: its identity less the grid's axes (``GRID_FLAGS``) — the
    #: main.py flags its method uses, the scaling rule, the replica count and the data
    #: fingerprint — as sorted (name, value) pairs. The same for the same run whichever
    #: sweep plans it.
    config: tuple = ()
    attack_source: str | None = None  # None: vanilla
    #: Where the data was read when the run was planned (shown, not part of the identity).
    data_dir: str | None = None
    #: The run's learning rate and warmup as multiples of the scaled ones (the tuning
    #: axes): ``learning_rate`` = lr_multiplier × base rate × k.
    lr_multiplier: float = 1.0
    warmup_multiplier: float = 1.0

    @property
    def name(self) -> str:
        """The run's directory name under ``OUT/runs``."""
        name = f"{self.method}_b{self.batch_size}"
        if self.attack_eps is not None:
            name += f"_eps{_number(self.attack_eps)}"
        if self.staleness is not None:
            name += f"_tau{self.staleness}"
        if self.attack_source not in (None, "separate"):
            name += f"_{self.attack_source}"
        if self.lr_multiplier != 1:
            name += f"_lrx{_number(self.lr_multiplier)}"
        if self.warmup_multiplier != 1:
            name += f"_wux{_number(self.warmup_multiplier)}"
        name += f"_seed{self.seed}"
        return f"{name}_{self.identity}" if self.identity else name

    def flags(self) -> list[str]:
        """main.py flags of this grid point (the model directory is added by the runner)."""
        flags = [
            f"--method={self.method}",
            f"--batch_size={self.batch_size}",
            f"--seed={self.seed}",
            f"--learning_rate={self.learning_rate!r}",
            f"--warmup_epochs={self.warmup_epochs!r}",
        ]
        if self.attack_eps is not None:
            flags.append(f"--attack_eps={self.attack_eps!r}")
        if self.staleness is not None:
            flags.append(f"--staleness={self.staleness}")
        if self.attack_source is not None:
            flags.append(f"--attack_source={self.attack_source}")
        return flags

    def record(self) -> dict:
        """What ``run.json`` keeps, written once when the run is created: the grid point,
        the learning rate it got and the run's configuration."""
        record = {"name": self.name, **dataclasses.asdict(self)}
        record["config"] = dict(self.config)
        return record


def plan(
    methods,
    batch_sizes,
    seeds,
    attack_eps,
    staleness,
    attack_sources,
    *,
    lr_scaling: str,
    base_batch_size: int,
    base_learning_rate: float,
    base_warmup_epochs: float,
    lr_multipliers=(1.0,),
    warmup_multipliers=(1.0,),
) -> list[Run]:
    """Every run of the sweep, in the order they are trained: seed-major, so a
    partial sweep has every configuration at its first seeds. ``attack_eps``,
    ``staleness`` and ``attack_sources`` are lists (one value where not swept);
    a method gets those it uses (vanilla none, DisAdv no τ). ``lr_multipliers``
    and ``warmup_multipliers`` are multiples of the scaled learning rate and
    warmup (η₀·k, w₀·k), not rates: (1,) is the scaling rule's own value."""
    runs = []
    for seed, batch_size, method in itertools.product(seeds, batch_sizes, methods):
        k = scale_factor(lr_scaling, batch_size, base_batch_size)
        adversarial = method != steps_lib.VANILLA
        for eps in attack_eps if adversarial else [None]:
            taus = staleness if method == steps_lib.CONADV else [None]
            sources = attack_sources if adversarial else [None]
            for tau, source, lr_m, warmup_m in itertools.product(
                taus, sources, lr_multipliers, warmup_multipliers
            ):
                runs.append(
                    Run(
                        method=method,
                        batch_size=int(batch_size),
                        seed=int(seed),
                        attack_eps=None if eps is None else float(eps),
                        staleness=None if tau is None else int(tau),
                        # (η₀·k)·m: at m = 1 exactly the rate of a sweep without the axes.
                        learning_rate=base_learning_rate * k * float(lr_m),
                        warmup_epochs=base_warmup_epochs * k * float(warmup_m),
                        attack_source=source,
                        lr_multiplier=float(lr_m),
                        warmup_multiplier=float(warmup_m),
                    )
                )
    return runs
