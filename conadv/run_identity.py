"""Which flags define a run, and the check that keeps a --model_dir to one run.

A ``--model_dir`` holds one run: the first start writes the flags that define
it (method, model, data, batch, optimisation, attack, precision, seed...) to
``run_config.json``; a later start whose defining flags differ stops with one
line naming each difference, instead of "resuming" a run made with other
settings. Flags that may change between starts — how long to train, how
often to log, evaluate and checkpoint, where the data and exports live, on
which devices — are listed in ``RESUMABLE_FLAGS``. The default ``--model_dir``
ends in a short hash of the defining flags, so two different runs started
with defaults never share a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

RUN_CONFIG = "run_config.json"

#: Flags whose values make a different run.
DEFINING_FLAGS = (
    "dataset",
    "image_size",
    "num_classes",
    "one_based_labels",
    "augment",
    "autoaugment_policy",
    "randaugment_layers",
    "randaugment_magnitude",
    "deterministic",
    "model",
    "width_multiplier",
    "bn_group_size",
    "precision",
    "method",
    "staleness",
    "attack_eps",
    "attack_step_size",
    "attack_steps",
    "attack_init",
    "attack_bn",
    "attack_target",
    "batch_size",
    "accumulation_steps",
    "optimizer",
    "learning_rate",
    "warmup_epochs",
    "lr_schedule",
    "poly_power",
    "end_learning_rate",
    "weight_decay",
    "momentum",
    "label_smoothing",
    "lars_eta",
    "seed",
)

#: Flags that may change when a run is resumed (listed in the --model_dir help).
RESUMABLE_FLAGS = (
    "train_steps",
    "train_epochs",
    "steps_per_loop",
    "epochs_between_evals",
    "checkpoint_steps",
    "mode",
    "eval_batch_size",
    "eval_attack_eps",
    "eval_attack_steps",
    "eval_attack_step_size",
    "eval_predictions",
    "data_dir",
    "export_dir",
    "cache_eval",
    "skip_corrupt_records",
    "tf_data_service",
    "tfds_download",
    "distribution_strategy",
    "num_cpu_devices",
    "tpu",
    "num_replicas",
    "all_reduce_alg",
    "jit_compile",
    "update_pass",
    "mlperf_log",
    "mlperf_org",
    "mlperf_division",
    "mlperf_platform",
    "target_accuracy",
    "verbosity",
)


class RunMismatchError(ValueError):
    """A --model_dir started with other defining flags; the message is one line."""


def defining_values(values) -> dict:
    """The defining flags' values, from a dict of flag values or absl FLAGS (or alike)."""
    if isinstance(values, dict):
        return {name: values[name] for name in DEFINING_FLAGS}
    return {name: getattr(values, name) for name in DEFINING_FLAGS}


def run_hash(defining: dict) -> str:
    text = json.dumps(defining, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_model_dir(values) -> str:
    """<tmp>/conadv/<dataset>_<model>_<method>_<hash of the defining flags>."""
    defining = defining_values(values)
    name = f"{defining['dataset'].replace(':', '_')}_{defining['model']}_{defining['method']}"
    return os.path.join(tempfile.gettempdir(), "conadv", f"{name}_{run_hash(defining)}")


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "(default)" if value is None else str(value)


def check_or_record(run, record: bool = True) -> dict:
    """Writes the run (a ``RunConfig``) as ``run_config.json`` on a first start;
    on a later one, compares its defining flags with the recorded ones.

    Raises ``RunMismatchError`` naming every defining flag whose value differs.
    Returns the recorded defining flags. ``record=False`` (a non-chief worker)
    only compares: every worker stops on a mismatch, none waits for another.
    """
    import tensorflow as tf  # not at import: main.py imports this before TensorFlow

    path = os.path.join(run.model_dir, RUN_CONFIG)
    current = defining_values(run.flags)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            stored = json.load(f)
        # "defining_flags": the form written before run_config.json held the whole run.
        recorded = stored.get("flags") or stored.get("defining_flags", {})
        differences = [
            f"--{name}={_show(recorded.get(name))}, not {_show(current.get(name))}"
            for name in DEFINING_FLAGS
            if name in recorded and recorded[name] != current[name]
        ]
        if differences:
            raise RunMismatchError(
                f"--model_dir={run.model_dir} was trained with {'; '.join(differences)}; "
                "use a new --model_dir (or the flags it was trained with)"
            )
        return {name: recorded.get(name) for name in DEFINING_FLAGS}
    if record:
        run.write(path)
    return current
