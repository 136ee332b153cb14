"""Reruns the paper's studies: a sweep of training runs, and its report.

    conadv-experiments sweep --out DIR --methods vanilla,disadv,conadv \\
        --batch_sizes 256,1024,4096 --seeds 0,1,2 [--attack_eps 2,4,8] [--staleness 1,2] \\
        [--lr_scaling linear|sqrt|none] [--base_batch_size 256] [--parallel N] [--dry_run] \\
        [--learning_rates 0.5,1,2 --warmups 1 --selection_examples 10000] \\
        [any main.py flag, e.g. --dataset=imagenet --train_epochs=90]
    conadv-experiments report --out DIR

(``python -m conadv.studies.experiments`` is the same program.)

``sweep`` trains every configuration of the cross product as its own
``main.py`` run under ``DIR/runs/<name>`` (``conadv/studies/runner.py``):
finished runs are skipped, an interrupted one resumes from its checkpoint, a
progress line per run shows an ETA, and each finished run is recorded in
TensorBoard's HParams dashboard (``tensorboard --logdir DIR``). A run whose
loss went non-finite (say, a too-large learning rate of a tuning sweep) is
done with the result "diverged" (``diverged.json``), not a failure: the
sweep goes on and counts it, and the report never chooses its setting. Learning
rate and warmup scale with the batch size by ``--lr_scaling`` from
``--base_batch_size`` (``conadv/studies/grid.py`` states the rule).
``--learning_rates`` and ``--warmups`` sweep multiples of the scaled learning
rate and warmup (tuning axes; a run's name spells a multiplier other than 1,
``_lrx2``); several of either need main.py's ``--selection_examples``, the
held-out training examples the report chooses each method's setting on.
``--dry_run`` lists the runs, their learning rates (each multiplier's, per
batch) and lengths, and trains nothing.

``report`` writes ``DIR/results.csv`` (a row per finished run), ``DIR/report.md``
(the paper's tables with spreads over seeds and paired intervals) and PNG
plots (``conadv/studies/report.py``). Where several settings of a method and
batch were trained, the report picks one by its mean selection top-1 on the
held-out training examples (``conadv/studies/tuning.py``); several learning
rates or warmups are never chosen among by test top-1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags as absl_flags

import flags as main_flags
from conadv.studies import grid
from conadv.studies.sweep_flags import define, multipliers, parse
from flags import sharpness as sharpness_flags
from flags.validation import FlagError, settle_attack_source


def _require(condition: bool, message: str):
    if not condition:
        raise FlagError(message)


def _main_values(main_args: list[str], run: grid.Run) -> absl_flags.FlagValues:
    """main.py's flags for ``run``: the sweep's main.py flags, then the run's own."""
    values = absl_flags.FlagValues()
    main_flags.define_all(values)
    values(["main.py", *main_args, *run.flags(), "--model_dir=/nonexistent"])
    settle_attack_source(values)  # as main.py does, before its identity is taken
    return values


def _replicas(values) -> int:
    """The replica count each run will have (part of its identity): ``--num_replicas``
    where given, else what the local strategy will have."""
    from official import distribute

    if values.num_replicas is not None:
        return values.num_replicas
    count = distribute.planned_replica_count(values.distribution_strategy, values.num_cpu_devices)
    _require(
        count is not None,
        f"a sweep on --distribution_strategy={values.distribution_strategy} needs "
        "--num_replicas (the replica count is part of each run's identity)",
    )
    return count


def identity_of(values, scaling: dict, fingerprints: dict) -> dict:
    """What a run's identity hashes: the defining main.py flags its method uses, the
    flags that change what it reports, the scaling rule, the replica count and the data's
    fingerprint (``fingerprints`` caches one per data set)."""
    from conadv.run import run_identity
    from conadv.run_config import RunConfig

    defining = run_identity.relevant_values(run_identity.defining_values(values))
    identity = {**defining, **{name: values[name].value for name in grid.RESULT_FLAGS}}
    identity.update(scaling)
    identity["replicas"] = _replicas(values)
    key = (values.dataset, values.data_dir)
    if key not in fingerprints:
        fingerprints[key] = RunConfig.from_flags(values).data.build_source().fingerprint()
    identity["data_fingerprint"] = fingerprints[key]
    return identity


def plan(fv, main_fv, main_args: list[str]) -> list[grid.Run]:
    """Every run of the sweep, each with its identity and configuration (``grid.Run``)."""
    from conadv.run import run_identity

    runs = grid.plan(
        fv.methods,
        [int(b) for b in fv.batch_sizes],
        [int(s) for s in fv.seeds],
        [float(e) for e in fv.attack_eps] if fv.attack_eps else [main_fv.attack_eps],
        [int(t) for t in fv.staleness] if fv.staleness else [main_fv.staleness],
        fv.attack_source or [main_fv.attack_source],
        lr_scaling=fv.lr_scaling,
        base_batch_size=fv.base_batch_size,
        base_learning_rate=main_fv.learning_rate,
        base_warmup_epochs=main_fv.warmup_epochs,
        lr_multipliers=multipliers(fv.learning_rates, "learning_rates"),
        warmup_multipliers=multipliers(fv.warmups, "warmups"),
    )
    scaling = {
        "lr_scaling": fv.lr_scaling,
        "base_batch_size": fv.base_batch_size,
        "base_learning_rate": main_fv.learning_rate,
        "base_warmup_epochs": main_fv.warmup_epochs,
    }
    fingerprints = {}
    identified = []
    for run in runs:
        values = _main_values(main_args, run)
        identity = identity_of(values, scaling, fingerprints)
        config = {k: v for k, v in identity.items() if k not in grid.GRID_FLAGS}
        identified.append(
            dataclasses.replace(
                run,
                identity=run_identity.run_hash(identity),
                config=tuple(sorted(config.items())),
                data_dir=values.data_dir,
            )
        )
    return identified


def describe(runs: list[grid.Run], main_fv, main_args: list[str]) -> list[dict]:
    """One row per run: learning rate, warmup and length (from the data's size); a warmup
    as long as the run is a one-line error."""
    from conadv.run_config import RunConfig
    from conadv.studies import dry_run

    sizes = {}
    rows = []
    for run in runs:
        config = RunConfig.from_flags(_main_values(main_args, run))
        key = (config.data.dataset, config.data.data_dir, config.data.train_examples)
        if key not in sizes:
            sizes[key] = dry_run.training_set_size(config)
        per_epoch, steps, warmup = dry_run.planned_length(config, sizes[key])
        _require(
            run.batch_size <= sizes[key],
            f"--batch_sizes: {run.batch_size} is larger than the {sizes[key]} training images",
        )
        dry_run.check_warmup(config, per_epoch, steps, f"run {run.name}")
        rows.append(
            {
                "name": run.name,
                "batch_size": run.batch_size,
                "learning_rate": run.learning_rate,
                "warmup_epochs": run.warmup_epochs,
                "warmup_steps": warmup,
                "steps_per_epoch": per_epoch,
                "train_steps": steps,
            }
        )
    width = max(len(r["name"]) for r in rows) + 2
    print(
        f"{'run':<{width}}{'batch':>7}{'lr':>11}{'warmup ep':>11}{'warmup st':>11}"
        f"{'steps':>8}{'steps/ep':>10}"
    )
    for r in rows:
        print(
            f"{r['name']:<{width}}{r['batch_size']:>7}{r['learning_rate']:>11.4g}"
            f"{r['warmup_epochs']:>11.3g}{r['warmup_steps']:>11}{r['train_steps']:>8}"
            f"{r['steps_per_epoch']:>10}"
        )
    return rows


def tuning_rates(runs: list[grid.Run]) -> list[str]:
    """The tuning axes' rates, a line per batch: each multiplier and what it gives there."""
    lines = []
    for batch in sorted({run.batch_size for run in runs}):
        at = [run for run in runs if run.batch_size == batch]
        for what, rate, multiplier in (
            ("learning rates", "learning_rate", "lr_multiplier"),
            ("warmups (epochs)", "warmup_epochs", "warmup_multiplier"),
        ):
            pairs = sorted({(getattr(r, multiplier), getattr(r, rate)) for r in at})
            listed = ", ".join(f"×{m:g} = {value:.4g}" for m, value in pairs)
            lines.append(f"batch {batch}: {what} {listed}")
    print("\n".join(lines))
    return lines


def other_configurations(out: str, runs: list[grid.Run]) -> list[str]:
    """The runs under ``OUT/runs`` that no report section shares with this sweep's: of
    another configuration, neither part of one of this sweep's (a vanilla run has no
    attack flags, so it belongs to every configuration of its other flags) nor
    containing one."""
    from conadv.studies.sections import part_of

    directory = os.path.join(out, "runs")
    if not os.path.isdir(directory):
        return []
    mine = [dict(run.config) for run in runs]
    others = []
    for name in sorted(os.listdir(directory)):
        try:
            with open(os.path.join(directory, name, "run.json")) as f:
                config = json.load(f).get("config", {})
        except (FileNotFoundError, ValueError):
            continue  # not a run of a sweep
        if not any(part_of(config, m) or part_of(m, config) for m in mine):
            others.append(name)
    return others


def sweep(fv, main_fv, main_args: list[str]):
    from conadv.studies import hparams, runner

    runs = plan(fv, main_fv, main_args)
    print(
        f"{len(runs)} runs; learning rate {main_fv.learning_rate:g} and warmup "
        f"{main_fv.warmup_epochs:g} epochs at batch {fv.base_batch_size}, "
        f"scaled {fv.lr_scaling}"
    )
    rows = describe(runs, main_fv, main_args)
    if fv.learning_rates or fv.warmups:
        tuning_rates(runs)
    others = other_configurations(fv.out, runs)
    if others:
        print(
            f"note: {len(others)} run(s) in {os.path.join(fv.out, 'runs')} were made with "
            "other flags or another --lr_scaling; this sweep trains its own beside them, and "
            "the report keeps each configuration apart"
        )
    if fv.dry_run:
        return rows
    os.makedirs(fv.out, exist_ok=True)
    hparams.write_config(fv.out, runs)
    measure = sharpness_flags.settings(main_fv) if fv.sharpness else None
    summaries = runner.train_all(fv.out, runs, main_args, parallel=fv.parallel, sharpness=measure)
    diverged = sum(bool(summary.get("diverged")) for summary in summaries.values())
    print(
        f"sweep finished: {len(summaries)} runs ({diverged} diverged) in "
        f"{os.path.join(fv.out, 'runs')}; conadv-experiments report --out {fv.out}"
    )
    return summaries


def write_report(out: str) -> list:
    """results.csv, report.md and the plots of the sweep in ``out``; returns one report per
    configuration (``report.configurations``: runs of other flags are kept apart)."""
    from conadv.studies import figures, tables
    from conadv.studies import report as report_lib

    rows = report_lib.collect(out)
    if not rows:
        raise FileNotFoundError(
            f"no finished run under {os.path.join(out, 'runs')} (no summary.json); "
            "run `conadv-experiments sweep --out DIR ...` first"
        )
    reports = report_lib.build_all(rows)
    report_lib.write_csv(rows, os.path.join(out, "results.csv"))
    sections = []
    for index, report in enumerate(reports):
        report.markdown = tables.markdown(report)
        prefix = f"config{index + 1}_" if len(reports) > 1 else ""
        report.figures = figures.plot_all(report, out, prefix)
        images = "\n".join(f"![{name}]({name})" for name in report.figures)
        sections.append(report.markdown + "\n## Plots\n\n" + images + "\n")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(sections))
    return reports


def report(fv):
    reports = write_report(fv.out)
    for result in reports:
        print(result.markdown)
    print(f"\nwritten: {os.path.join(fv.out, 'report.md')}, results.csv and the plots")
    return reports


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv):
        fv = absl_flags.FlagValues()
        define(fv)
        print(__doc__)
        print(fv.get_help())
        return None
    try:
        command, fv, main_fv, main_args = parse(argv)
        if command == "sweep":
            return sweep(fv, main_fv, main_args)
        return report(fv)
    except (FlagError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    except ValueError as error:
        from conadv.run.run_identity import RunMismatchError
        from conadv.studies.sections import ReportError
        from input_pipeline.base import DataError

        if isinstance(error, (ReportError, DataError, RunMismatchError)):
            raise SystemExit(f"error: {error}") from None
        raise
    except RuntimeError as error:
        from conadv.studies.runner import RunFailedError

        if isinstance(error, RunFailedError):
            raise SystemExit(f"error: {error}") from None
        raise


if __name__ == "__main__":
    main()
