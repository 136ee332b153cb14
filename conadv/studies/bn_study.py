"""Evaluation with moving against precise BatchNorm statistics, over methods and seeds.

    conadv-bn-study --out /tmp/bn_study --methods vanilla,disadv,conadv \\
        --seeds 0,1,2,3,4 [-- any main.py flag, e.g. --attack_eps=0 --bn_momentum=0.99]

(``python -m conadv.studies.bn_study`` is the same program.)

Trains one run per (method, seed) with ``main.py`` (a process each, under
``OUT/<method>_seed<S>``; a run whose ``summary.json`` exists is not trained
again), then prints a Markdown table of eval top-1 with the moving-average
statistics (``eval_top1_moving_average``) and with precise ones
(``eval_top1``), per seed and as the mean over seeds, and writes the rows to
``OUT/results.json``. Both numbers come from the same trained weights, so
their difference is the statistics' alone.

``--diagnose`` then separates the two ways precise statistics differ from
the moving ones — taken under the final weights instead of averaged over
recent steps, and on evaluation-preprocessed instead of augmented images —
by evaluating each run's final weights two more ways: population statistics
of one batch, and of one epoch, of the *augmented* training stream (one batch
is noisier than the moving average, which spans about 19 batches at
momentum 0.9, but it is taken under the final weights). The table then has
``moving → augmented, 1 batch → augmented, 1 epoch → precise`` (evaluation
preprocessing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory for the runs and results.json.")
flags.DEFINE_list("methods", ["vanilla", "disadv", "conadv"], "Methods to train.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds (--seed of main.py).")
flags.DEFINE_bool(
    "diagnose",
    False,
    "Also evaluate each run with precise statistics of the augmented training stream.",
)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, f"{method}_seed{seed}")


def train(out: str, method: str, seed: int, extra: list[str]) -> dict:
    """The run's summary.json, training it first if it has none."""
    directory = run_dir(out, method, seed)
    summary_path = os.path.join(directory, "summary.json")
    if not os.path.exists(summary_path):
        command = [
            sys.executable,
            os.path.join(HERE, "main.py"),
            f"--method={method}",
            f"--seed={seed}",
            f"--model_dir={directory}",
            *extra,
        ]
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(summary_path) as f:
        return json.load(f)


def augmented_precise_top1(directory: str) -> dict:
    """Eval top-1 of a run's final weights with population statistics of the augmented
    training stream: its first batch (``augmented_1``) and one epoch (``augmented``)."""
    import tensorflow as tf

    from conadv.run_config import RunConfig
    from conadv.trainer import Trainer
    from input_pipeline.base import EVAL, TRAIN

    with open(os.path.join(directory, "run_config.json")) as f:
        run = RunConfig.from_dict(json.load(f))
    strategy = tf.distribute.get_strategy()
    source = run.data.build_source()
    trainer = Trainer(run.train, strategy, source)
    trainer.restore()
    stream = source.distribute(strategy, TRAIN, run.train.global_batch_size)
    top1 = {}
    for key, batches in (("augmented_1", 1), ("augmented", trainer.steps_per_epoch)):
        statistics = trainer.evaluator.precise_bn.compute(stream, batches)
        with trainer.evaluator.precise_bn.applied(statistics):
            top1[key] = trainer.evaluate(EVAL, precise=False)["top1"]
    trainer.close()
    return top1


def table(rows: list[dict], seeds: list[int]) -> str:
    """Eval top-1 per method: each seed as 'moving → precise', and the means."""
    head = "| method | " + " | ".join(f"seed {s}" for s in seeds)
    head += " | mean (moving) | mean (precise) |"
    diagnosed = all("augmented" in row for row in rows)
    if diagnosed:
        head = head.replace(
            " | mean (precise) |",
            " | mean (augmented, 1 batch) | mean (augmented) | mean (precise) |",
        )
    lines = [head, "|---" * (len(seeds) + 3 + 2 * diagnosed) + "|"]
    keys = ("moving", "augmented_1", "augmented", "precise") if diagnosed else ("moving", "precise")
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = {row["seed"]: row for row in rows if row["method"] == method}
        cells = [" → ".join(f"{mine[s][k]:.4f}" for k in keys) if s in mine else "" for s in seeds]
        means = " | ".join(f"{np.mean([row[k] for row in mine.values()]):.4f}" for k in keys)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {means} |")
    return "\n".join(lines)


def main(argv):
    if not FLAGS.out:
        raise app.UsageError("--out is required: the directory for the runs")
    extra = list(argv[1:])
    seeds = [int(s) for s in FLAGS.seeds]
    rows = []
    for method in FLAGS.methods:
        for seed in seeds:
            summary = train(FLAGS.out, method, seed, extra)
            if summary.get("eval_top1_moving_average") is None:
                raise SystemExit(
                    f"error: {run_dir(FLAGS.out, method, seed)}/summary.json has no "
                    "eval_top1_moving_average: train with --precise_bn_batches > 0"
                )
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "moving": summary["eval_top1_moving_average"],
                    "precise": summary["eval_top1"],
                    "train_top1": summary["train_top1"],
                    "flags": extra,
                }
            )
            if FLAGS.diagnose:
                rows[-1].update(augmented_precise_top1(run_dir(FLAGS.out, method, seed)))
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    kinds = (
        "moving → precise"
        if not FLAGS.diagnose
        else ("moving → augmented 1 batch → augmented 1 epoch → precise")
    )
    print(f"eval top-1 with {kinds} BatchNorm statistics ({' '.join(extra) or 'defaults'}):")
    print(table(rows, seeds))


def run():
    """``conadv-bn-study`` and ``python -m conadv.studies.bn_study``: ``app.run(main)``,
    but ``--help`` prints this module's doc and flags and exits 0 (absl's own exits 1
    and lists the flags of ``__main__``, which under a console script is the script)."""
    own = sys.argv[1 : sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    if any(arg in ("--help", "-h", "--helpshort", "--helpfull") for arg in own):
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]))
        return
    app.run(main)


if __name__ == "__main__":
    run()
