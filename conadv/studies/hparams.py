"""A sweep in TensorBoard's HParams dashboard: one session per finished run.

``tensorboard --logdir OUT`` shows the sweep. ``OUT/hparams_config`` holds
the experiment (the swept hyperparameters and the metrics); each finished run
gets ``OUT/runs/<name>/hparams`` with its session (its hyperparameters) and
its final metrics as scalars at its last step. Written once per run (the
directory is made under a temporary name and renamed), so a resumed sweep
never records a run twice.
"""

from __future__ import annotations

import os
import shutil

from conadv.studies.grid import Run

#: Final metrics of a run: (scalar tag, summary.json key or a function of it).
METRICS = {
    "final/eval_top1": "eval_top1",
    "final/train_top1": "train_top1",
    "final/generalization_gap": lambda s: (
        None
        if s.get("train_top1") is None or s.get("eval_top1") is None
        else s["train_top1"] - s["eval_top1"]
    ),
    "final/eval_top1_moving_average": "eval_top1_moving_average",
    # Top-1 on the held-out training examples (main.py --selection_examples), if any.
    "final/selection_top1": "selection_top1",
    "final/robust_top1": "eval_robust_top1",
    "final/images_per_second": "images_per_second",
}

HPARAM_NAMES = (
    "method",
    "batch_size",
    "seed",
    "attack_eps",
    "staleness",
    "attack_source",
    "learning_rate",
    "warmup_epochs",
    "lr_multiplier",
    "warmup_multiplier",
)


def _values(run: Run) -> dict:
    record = run.record()
    values = {}
    for name in HPARAM_NAMES:
        value = record[name]
        # HParams values are str, bool or float: an unswept ε or τ is "-".
        values[name] = "-" if value is None else value
    return values


def metric_values(summary: dict) -> dict[str, float]:
    out = {}
    for tag, key in METRICS.items():
        value = key(summary) if callable(key) else summary.get(key)
        if value is not None:
            out[tag] = float(value)
    return out


def write_config(out: str, runs: list[Run]):
    """The experiment: every hyperparameter's values in the sweep, and the metrics."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    params = []
    for name in HPARAM_NAMES:
        values = sorted({_values(run)[name] for run in runs}, key=str)
        if all(isinstance(v, str) for v in values):
            params.append(hp.HParam(name, hp.Discrete(values)))
        else:
            params.append(hp.HParam(name))
    metrics = [hp.Metric(tag, display_name=tag.split("/", 1)[1]) for tag in METRICS]
    writer = tf.summary.create_file_writer(os.path.join(out, "hparams_config"))
    with writer.as_default():
        hp.hparams_config(hparams=params, metrics=metrics)
    writer.close()


def write_session(directory: str, run: Run, summary: dict):
    """The run's session and final metrics, unless already written."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    final = os.path.join(directory, "hparams")
    if os.path.isdir(final):
        return
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    writer = tf.summary.create_file_writer(partial)
    with writer.as_default():
        hp.hparams(_values(run), trial_id=run.name)
        step = int(summary.get("train_steps") or 0)
        for tag, value in metric_values(summary).items():
            tf.summary.scalar(tag, value, step=step)
    writer.close()
    os.replace(partial, final)
