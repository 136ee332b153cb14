"""Where each worker of a run writes, and how the workers agree on what to resume.

On one host (or a TPU, whose host program is one) everything goes to
``--model_dir``. With several workers (``multi_worker_mirrored``) every
worker runs the same program, but only the chief's files are the run's:
the chief writes checkpoints, TensorBoard summaries, ``summary.json``, the
log and the export into ``--model_dir``; every other worker writes its own
into ``<model_dir>/worker_<i>``, which it removes when the run ends, as
TensorFlow's multi-worker guide prescribes. Its checkpoints there hold only
what is its own — its replicas' ConAdv ring slots — so a killed and
restarted cluster resumes with each worker's ring restored; weights and
optimizer state are read from the chief's checkpoint by every worker.

Workers agree (one small collective) on the step to resume from — the
latest step for which every worker has a checkpoint — and on whether every
ring was restored, so no worker ever refills its ring while another does
not, and on whether one of them was asked to stop (SIGTERM).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
from absl import logging


class RunFiles:
    """This worker's directories in a run, and the agreements between workers."""

    def __init__(self, model_dir: str, strategy: tf.distribute.Strategy):
        self.model_dir = model_dir
        self.strategy = strategy
        self.multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
            strategy.extended._in_multi_worker_mode()  # noqa: SLF001 (no public equivalent)
        )
        self.is_chief = bool(strategy.extended.should_checkpoint)
        #: Index of this worker's ring in checkpoints (0 on one host).
        self.worker_index = 0 if self.is_chief else self.worker_id()

    def worker_id(self) -> int:
        """This worker's number in the cluster (the chief is 0)."""
        resolver = self.strategy.cluster_resolver
        if resolver.task_type == "chief":
            return 0
        has_chief = "chief" in resolver.cluster_spec().jobs
        return int(resolver.task_id) + (1 if has_chief else 0)

    def private_dir(self) -> str:
        """This worker's own directory: model_dir for the chief, else worker_<i> inside it."""
        if self.is_chief:
            return self.model_dir
        path = os.path.join(self.model_dir, f"worker_{self.worker_index}")
        tf.io.gfile.makedirs(path)
        return path

    def clean_up(self):
        """Removes a non-chief worker's directory at the end of the run.

        Close what writes there first (its log file, summary writers). A
        failure to remove it (say, a file an NFS server still holds) is a
        warning, not a failed run.
        """
        if self.is_chief:
            return
        path = self.private_dir()
        try:
            if tf.io.gfile.exists(path):
                tf.io.gfile.rmtree(path)
        except (tf.errors.OpError, OSError) as error:
            logging.warning("Could not remove this worker's directory %s: %s", path, error)

    def remove_interrupted_writes(self):
        """Removes what a killed run left half-written: TensorFlow writes the
        ``checkpoint`` state file as ``checkpoint.tmp<id>`` and renames it, so a
        process killed in between leaves the temporary (the state file itself is
        still the last complete one). The chief's, at the start of a run."""
        if not self.is_chief:
            return
        for path in tf.io.gfile.glob(os.path.join(self.model_dir, "checkpoint.tmp*")):
            try:
                tf.io.gfile.remove(path)
            except (tf.errors.OpError, OSError) as error:
                logging.warning("Could not remove %s left by an interrupted run: %s", path, error)

    # ---------------------------------------------------------- agreements

    def _gather(self, value: int) -> list[int]:
        """``value`` of every replica of every worker (a collective on several workers)."""
        if not self.multi_worker:
            return [int(value)]
        per_replica = self.strategy.run(lambda: tf.constant([value], tf.int64))
        return [int(v) for v in np.ravel(self.strategy.gather(per_replica, axis=0).numpy())]

    def agreed_step(self, local_latest: int) -> int:
        """The latest checkpoint step every worker has (-1: none)."""
        return min(self._gather(local_latest))

    def all_agree(self, local: bool) -> bool:
        """True if ``local`` is true on every worker."""
        return min(self._gather(int(local))) == 1

    def any_asks(self, local: bool) -> bool:
        """True if ``local`` is true on some worker."""
        return max(self._gather(int(local))) == 1


def planned_private_dir(model_dir: str, tf_config: str) -> str | None:
    """``RunFiles.private_dir`` of the task ``TF_CONFIG`` names, before the strategy exists
    (where a worker's log goes while the cluster starts); no directory is created. None
    when ``TF_CONFIG`` names no task of a cluster: ``official/distribute.py`` then says
    what is wrong with it in one line."""
    try:
        config = json.loads(tf_config or "{}")
        task, jobs = config["task"], config["cluster"]
        kind, index = task["type"], int(task.get("index", 0))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if kind == "chief" or (kind == "worker" and index == 0 and "chief" not in jobs):
        return model_dir
    return os.path.join(model_dir, f"worker_{index + (1 if 'chief' in jobs else 0)}")


def write_json(path: str, values: dict):
    """Writes atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)
