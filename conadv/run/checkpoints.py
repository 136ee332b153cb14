"""A run's checkpoints: what is saved, by which worker, and the step a restart resumes from.

Everything that must survive a restart — model, optimizer (its step
counter is the global step) and ConAdv's ring buffer — is in one
``tf.train.Checkpoint`` under ``model_dir``, the model's variables by
their paths (``model_state``). Every worker reads weights and
optimizer state from the chief's checkpoints there; the chief writes them.
A non-chief worker's ring slots go to its own checkpoints in ``worker_<i>``
(``conadv/run/run_files.py``). Ring state is keyed by worker and layout: a
checkpoint from another replica count, batch or worker leaves it
unrestored, and the ring is then refilled from the restored weights.

The ring is anything with ``checkpoint_items()``, ``layout``,
``is_filled()`` and ``reset()`` (``conadv/ring_buffer.py``); this module
does not need to know what it holds.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from conadv.run.run_files import RunFiles


class CheckpointMismatchError(ValueError):
    """A checkpoint in model_dir that cannot be restored into the model the flags describe."""


def model_state(model) -> tf.train.Checkpoint:
    """Every variable of ``model`` by its path (``stage1_block1_conv1/kernel`` is saved as
    ``model/stage1_block1_conv1.kernel``): a checkpoint key names the layer, and holds
    the model's variable whatever else (the optimizer) also refers to it."""
    variables = {v.path.replace("/", "."): v for v in model.variables}
    if len(variables) != len(model.variables):
        raise ValueError(f"model {model.name!r} has two variables of one path")
    return tf.train.Checkpoint(**variables)


class RunCheckpoints:
    """Saves and restores one run's model, optimizer and ring buffer."""

    def __init__(self, model, optimizer, ring, files: RunFiles, model_dir: str, max_to_keep: int):
        self.optimizer = optimizer
        self.ring = ring
        self.files = files
        self.model_dir = model_dir
        #: The step of the latest complete checkpoint (-1: none).
        self.last_saved = -1
        self.model_state = model_state(model)
        items = dict(model=self.model_state, optimizer=optimizer)
        ring_key = None
        if ring is not None:
            ring_key = f"ring_w{files.worker_index}_{ring.layout}"
            ring_items = tf.train.Checkpoint(**ring.checkpoint_items())
            if files.is_chief:
                items[ring_key] = ring_items
        self.checkpoint = tf.train.Checkpoint(**items)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            directory=model_dir,
            max_to_keep=max_to_keep,
            checkpoint_name="ckpt",
            step_counter=optimizer.iterations,
        )
        self.ring_manager = None
        if ring_key is not None and not files.is_chief:
            self.ring_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**{ring_key: ring_items}),
                directory=files.private_dir(),
                max_to_keep=max_to_keep,
                checkpoint_name="ring",
                step_counter=optimizer.iterations,
            )

    @property
    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def has_checkpoint(self) -> bool:
        return self.manager.latest_checkpoint is not None

    def _chief_steps(self) -> list[int]:
        """Steps of the chief's kept checkpoints (every worker reads model_dir)."""
        return _steps(self.manager.checkpoints)

    def resume_step(self) -> int:
        """The step to resume from: the latest every worker has its state for (-1: none).

        A non-chief worker's ring checkpoints lag the chief's by at most one
        save if the cluster was killed in between; a worker with no ring at
        all (its directory was removed at the end of a finished run) does not
        hold the others back: its ring will be refilled, and so will every
        worker's.
        """
        chief_steps = self._chief_steps()
        latest = chief_steps[-1] if chief_steps else -1
        low, high = self.files.agreed_step(latest), -self.files.agreed_step(-latest)
        if low != high:
            raise CheckpointMismatchError(
                f"the workers see different latest checkpoints in --model_dir="
                f"{self.model_dir} (steps {low} to {high}); every worker must use "
                "the same shared directory"
            )
        own = _steps(self.ring_manager.checkpoints) if self.ring_manager is not None else []
        return self.files.agreed_step(_local_resume_step(chief_steps, own))

    def restore(self) -> int:
        """Restores the checkpoint to resume from, if any; returns the step.

        Every worker restores weights and optimizer state from the chief's
        checkpoint at ``resume_step`` and its own ring from the same step; if
        any worker has no ring for it, every worker refills its ring.
        """
        self.files.remove_interrupted_writes()
        step = self.resume_step()
        if step >= 0:
            path = os.path.join(self.model_dir, f"ckpt-{step}")
            _restore_into(self.checkpoint, path)
            if step > 0 and self.global_step == 0:
                # The optimizer's state lives elsewhere in this checkpoint (for
                # example it was saved with or without float16 loss scaling).
                raise CheckpointMismatchError(
                    f"the checkpoint {path} was saved at step {step} but its optimizer "
                    "state does not fit this run (another --precision or --optimizer?); "
                    "use the flags it was trained with or a new --model_dir"
                )
            if self.ring_manager is not None:
                own = os.path.join(self.ring_manager.directory, f"ring-{step}")
                if tf.io.gfile.exists(own + ".index"):
                    self.ring_manager.checkpoint.restore(own).expect_partial()
            logging.info("Restored %s at step %d", path, self.global_step)
        self.last_saved = step
        if self.ring is not None and not self.files.all_agree(self.ring.is_filled()):
            if step >= 0:
                logging.info("Not every worker has its ring for step %d: all are refilled", step)
            self.ring.reset()
        return self.global_step

    def restore_weights(self) -> int:
        """Only the model's weights of the checkpoint to resume from, and its step: for a
        measurement in another precision than training's, whose optimizer (with or
        without float16 loss scaling) need not fit the checkpoint's."""
        self.files.remove_interrupted_writes()
        step = self.resume_step()
        if step >= 0:
            path = os.path.join(self.model_dir, f"ckpt-{step}")
            _restore_into(tf.train.Checkpoint(model=self.model_state), path, every_weight=True)
            self.optimizer.iterations.assign(step)
            logging.info("Restored the weights of %s at step %d", path, step)
        return step

    def save(self) -> str:
        """Every worker saves what is its own; returns the chief's checkpoint path."""
        step = self.global_step
        if self.ring_manager is not None:
            self.ring_manager.save(checkpoint_number=step)
        path = os.path.join(self.model_dir, f"ckpt-{step}")
        if self.files.is_chief:
            path = self.manager.save(checkpoint_number=step)
            logging.info("Saved checkpoint %s", path)
        self.last_saved = step
        return path


def _steps(paths) -> list[int]:
    """The steps of checkpoint paths (``.../ckpt-12``, ``.../ring-12``), sorted."""
    return sorted(int(path.rsplit("-", 1)[-1]) for path in paths)


def _local_resume_step(chief_steps: list[int], own_steps: list[int]) -> int:
    """One worker's latest step to resume from (-1: none): the chief's newest checkpoint
    for which this worker has its ring checkpoint; a worker with no ring checkpoint (or
    none the chief kept) does not hold the others back (its ring is refilled)."""
    latest = chief_steps[-1] if chief_steps else -1
    own = set(own_steps)
    return max((step for step in chief_steps if step in own), default=latest)


def resumable_step(model_dir: str) -> int:
    """The step a restart of the run in ``model_dir`` resumes from (-1: none), read from
    the checkpoint state files alone: what ``RunCheckpoints.resume_step`` agrees on with
    every worker (the chief's ``checkpoint`` and each ``worker_<i>/checkpoint``). For a
    worker whose peers are gone and cannot be asked (``conadv/run/cluster.py``): the
    chief's ckpt-N and a worker's ring-N are saved without a barrier, so the chief's
    newest checkpoint is not always where a restart resumes."""
    chief = _kept_steps(model_dir)
    step = chief[-1] if chief else -1
    for worker_dir in tf.io.gfile.glob(os.path.join(model_dir, "worker_*")):
        step = min(step, _local_resume_step(chief, _kept_steps(worker_dir)))
    return step


def _kept_steps(directory: str) -> list[int]:
    """The steps a CheckpointManager's state file in ``directory`` lists (none: [])."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):  # a half-written state file: as none
        state = None
    return _steps(state.all_model_checkpoint_paths) if state is not None else []


def _restore_into(checkpoint: tf.train.Checkpoint, path: str, every_weight: bool = False):
    """Restores what ``checkpoint`` holds from ``path``; a checkpoint of another model
    (with ``every_weight``: one that lacks any of ``checkpoint``'s variables) is a
    one-line error."""
    try:
        status = checkpoint.restore(path)
        if every_weight:
            status.assert_existing_objects_matched()
        status.expect_partial()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as error:
        raise CheckpointMismatchError(
            f"the checkpoint {path} does not fit this model "
            f"({str(error).splitlines()[0][:200]}); use a new --model_dir or the "
            "flags it was trained with"
        ) from None
