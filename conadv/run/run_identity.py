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

How long to train may change, but not silently: the poly and cosine decays
are planned over the whole run, so a new length changes the learning rate of
every step still to train. ``check_schedule`` keeps the planned length in
``run_config.json`` and, when a resume re-plans it, prints one ``note:`` line
and appends the change to the file's ``schedule_changes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from flags.validation import CLEAN_PASS_ATTACK

RUN_CONFIG = "run_config.json"

#: Flags whose values make a different run.
DEFINING_FLAGS = (
    "dataset",
    "image_size",
    "num_classes",
    "train_examples",
    "selection_examples",
    "selection_seed",
    "one_based_labels",
    "augment",
    "autoaugment_policy",
    "randaugment_layers",
    "randaugment_magnitude",
    "deterministic",
    "model",
    "width_multiplier",
    "bn_group_size",
    "bn_momentum",
    "precision",
    "method",
    "staleness",
    "attack_eps",
    "attack_step_size",
    "attack_steps",
    "attack_init",
    "attack_bn",
    "attack_target",
    "attack_source",
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
    "precise_bn_batches",
    "data_dir",
    "export_dir",
    "cache_eval",
    "skip_corrupt_records",
    "tf_data_service",
    "tf_data_service_workers",
    "tfds_download",
    "distribution_strategy",
    "num_cpu_devices",
    "tpu",
    "num_replicas",
    "all_reduce_alg",
    "peer_timeout",
    "cluster_start_timeout",
    "jit_compile",
    "update_pass",
    "mlperf_log",
    "mlperf_org",
    "mlperf_division",
    "mlperf_platform",
    "target_accuracy",
    "sharpness_examples",
    "sharpness_iterations",
    "sharpness_tolerance",
    "sharpness_eps",
    "sharpness_steps",
    "verbosity",
)

#: Modes that read a trained run: flags not given are the run's own (``fill_from_record``).
READING_MODES = ("eval", "export", "sharpness")

#: Flags a reading mode never takes from the record (``num_replicas``: a run trained on
#: two devices is read on any; the tf.data service: it speeds up training, and a trained
#: run is read without the dispatcher it trained with, which may be gone).
_NOT_FILLED = (
    "mode",
    "model_dir",
    "mlperf_log",
    "verbosity",
    "num_replicas",
    "tf_data_service",
    "tf_data_service_workers",
)


#: The flags of the adversarial examples: a vanilla run makes none.
ATTACK_FLAGS = tuple(name for name in DEFINING_FLAGS if name.startswith("attack_"))

#: What ``--attack_source=clean_pass`` fixes.
CLEAN_PASS_FIXED = tuple(CLEAN_PASS_ATTACK)


class RunMismatchError(ValueError):
    """A --model_dir started with other defining flags; the message is one line."""


def defining_values(values) -> dict:
    """The defining flags' values, from a dict of flag values or absl FLAGS (or alike)."""
    if isinstance(values, dict):
        return {name: values[name] for name in DEFINING_FLAGS}
    return {name: getattr(values, name) for name in DEFINING_FLAGS}


def relevant_values(defining: dict) -> dict:
    """The defining values that can change this run's numbers: a vanilla run has no
    attack, only ConAdv a τ, and ``--attack_source=clean_pass`` fixes its attack's
    steps, start, BatchNorm and target. So a vanilla run given another ``--attack_eps``
    is the same run (a sweep trains it once; a resume does not refuse it)."""
    method = defining.get("method")
    dropped = set()
    if method == "vanilla":
        dropped.update(ATTACK_FLAGS)
    if method != "conadv":
        dropped.add("staleness")
    if method != "vanilla" and defining.get("attack_source") == "clean_pass":
        dropped.update(CLEAN_PASS_FIXED)
    if not defining.get("selection_examples"):
        # No selection set: its seed picks nothing, and the run is the one recorded
        # before the flags existed (the same hash and configuration).
        dropped.update(("selection_examples", "selection_seed"))
    return {name: value for name, value in defining.items() if name not in dropped}


#: Defining flags added after runs had been recorded, with the value those runs had: at
#: that value a flag is left out of the hash, so older runs keep their directories.
ADDED_LATER = {
    "train_examples": None,
    "attack_source": "separate",
    "selection_examples": 0,
    "selection_seed": 0,
}


def run_hash(defining: dict) -> str:
    kept = {
        name: value
        for name, value in defining.items()
        if name not in ADDED_LATER or value != ADDED_LATER[name]
    }
    text = json.dumps(kept, sort_keys=True, default=str)
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


def fill_from_record(values) -> list[str]:
    """For ``--mode`` eval, export or sharpness on a ``--model_dir`` with a
    ``run_config.json``: every flag not given on the command line takes the run's
    recorded value, so no flag has to be repeated (one given that contradicts a defining
    one is then refused by ``check_or_record``). Returns the names filled in."""
    import tensorflow as tf  # not at import: main.py imports this before TensorFlow

    if values.mode not in READING_MODES or not values.model_dir:
        return []
    path = os.path.join(values.model_dir, RUN_CONFIG)
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        recorded = json.load(f).get("flags", {})
    filled = []
    for name, value in recorded.items():
        if name in _NOT_FILLED or name not in values or values[name].present:
            continue
        if name == "selection_seed" and not recorded.get("selection_examples"):
            continue  # selects nothing without a selection set (and alone is refused)
        if values[name].value != value:
            values[name].value = value
            filled.append(name)
    return filled


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
        # A flag added after the run was recorded had, for that run, its value then.
        recorded = {**{n: v for n, v in ADDED_LATER.items() if n not in recorded}, **recorded}
        relevant = set(relevant_values(current)) | set(relevant_values(recorded))
        differences = [
            f"--{name}={_show(recorded.get(name))}, not {_show(current.get(name))}"
            for name in DEFINING_FLAGS
            if name in relevant and name in recorded and recorded[name] != current[name]
        ]
        if differences:
            raise RunMismatchError(
                f"--model_dir={run.model_dir} was trained with {'; '.join(differences)}; "
                "use a new --model_dir (or the flags it was trained with)"
            )
        _check_data(run, stored)
        return {name: recorded.get(name) for name in DEFINING_FLAGS}
    if record:
        run.write(path)
    return current


def _check_data(run, stored: dict):
    """Refuses a start on other data than the run was trained on (another path to the
    same data is the same run: the fingerprint is of the content)."""
    recorded = stored.get("data_fingerprint")
    if recorded is None or run.data_fingerprint is None or recorded == run.data_fingerprint:
        return  # a run recorded before fingerprints were kept cannot be compared
    trained_on = stored.get("flags", {}).get("data_dir")
    given = run.flags.get("data_dir")
    raise RunMismatchError(
        f"--model_dir={run.model_dir} was trained on other data (fingerprint {recorded}"
        + (f", --data_dir={trained_on}" if trained_on else "")
        + f"), not on --dataset={run.flags.get('dataset')}"
        + (f" --data_dir={given}" if given else "")
        + f" (fingerprint {run.data_fingerprint}); use the data it was trained on, or a new "
        "--model_dir"
    )


def check_schedule(run, steps_per_epoch: int, train_steps: int) -> dict | None:
    """Records the length the learning-rate schedule is planned over; says and
    records a resume that changes it.

    Extending a run (a larger ``--train_steps`` or ``--train_epochs`` on its
    ``--model_dir``) is allowed, but the decay is then re-planned over the new
    length, which changes the learning rate from the checkpoint's step on
    (from the end learning rate back up, for a finished run). So the chief of
    a start that trains calls this once the trainer has resolved
    ``train_steps``; a change prints one line naming the flag, the old and
    new length and the learning rate at the checkpoint's step under both
    plans, and is appended to ``schedule_changes`` in ``run_config.json``
    (``step``, ``from``, ``to``, ``flag``, ``learning_rate_before``,
    ``learning_rate_after``). A restart with the same length, one with no
    checkpoint yet (nothing was trained on the old plan), one whose new
    length leaves nothing to train, and a change that leaves the curve as it
    was (``--lr_schedule=step``: boundaries are in epochs) print nothing and
    add no change. Returns the change, or None.
    """
    import tensorflow as tf  # not at import: main.py imports this before TensorFlow

    from conadv.run.run_files import write_json  # imports TensorFlow

    path = os.path.join(run.model_dir, RUN_CONFIG)
    with tf.io.gfile.GFile(path) as f:
        stored = json.load(f)
    step = _checkpoint_step(run.model_dir)
    planned = stored.get("schedule_steps")
    if planned is None and step is not None:
        planned = _length_from_flags(stored.get("flags", {}), steps_per_epoch)
    if planned == train_steps or (step is not None and train_steps <= step):
        return None
    change = None
    if planned is not None and step is not None:
        before = _schedule(run.train, steps_per_epoch, planned)
        after = _schedule(run.train, steps_per_epoch, train_steps)
        if before.get_config() != after.get_config():
            change = {
                "step": step,
                "from": planned,
                "to": train_steps,
                "flag": _length_flag(run.flags),
                "learning_rate_before": float(before(step)),
                "learning_rate_after": float(after(step)),
            }
            print(
                f"note: {change['flag']} changes the run's length from {planned} to "
                f"{train_steps} steps on resume: the {run.train.lr_schedule} schedule is "
                f"re-planned; learning rate at step {step} is now "
                f"{change['learning_rate_after']:.4g} (was {change['learning_rate_before']:.4g});"
                f" recorded in {RUN_CONFIG}",
                flush=True,
            )
    stored["schedule_steps"] = train_steps
    if change is not None:
        stored["schedule_changes"] = [*(stored.get("schedule_changes") or []), change]
    write_json(path, stored)
    return change


def _checkpoint_step(model_dir: str) -> int | None:
    """The step of the latest checkpoint in model_dir (the one a start resumes from)."""
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(model_dir)
    return None if latest is None else int(latest.rsplit("-", 1)[-1])


def _length_from_flags(recorded: dict, steps_per_epoch: int) -> int | None:
    """The planned length of a run_config.json written before it kept ``schedule_steps``
    (the trainer's rule: ``--train_steps``, else ``--train_epochs`` in steps)."""
    if recorded.get("train_steps"):
        return int(recorded["train_steps"])
    if recorded.get("train_epochs") is None:
        return None
    return max(1, round(recorded["train_epochs"] * steps_per_epoch))


def _length_flag(flags: dict) -> str:
    if flags.get("train_steps"):
        return f"--train_steps={flags['train_steps']}"
    return f"--train_epochs={_show(flags['train_epochs'])}"


def _schedule(train, steps_per_epoch: int, train_steps: int):
    """The trainer's learning-rate schedule for ``train`` (a TrainConfig) over train_steps."""
    from official import schedules

    return schedules.from_config(train, steps_per_epoch, train_steps)
