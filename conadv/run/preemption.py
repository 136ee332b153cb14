"""Turns SIGTERM into a checkpoint at the current step and a clean exit.

Preempted TPU VMs and cluster schedulers send SIGTERM and wait a grace period
before SIGKILL. The handler only notes the request; the training loop checks
it after each host loop (every ``steps_per_loop`` steps), writes a checkpoint
at that step and raises ``PreemptedError``, which ``main.py`` reports in one line.
A rerun of the same command resumes from that checkpoint.

A checkpoint is complete on disk before it becomes the latest:
``tf.train.CheckpointManager`` writes the data and index files first and only
then replaces the ``checkpoint`` state file (an atomic rename), so a crash
while saving leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

#: The exit status of a preempted run: 128 + SIGTERM, as if the signal had
#: ended it, so schedulers still see an unfinished job.
EXIT_CODE = 128 + signal.SIGTERM


class PreemptedError(Exception):
    """The run stopped on SIGTERM after saving; the message is one line."""


class PreemptionWatcher:
    """While active, SIGTERM sets ``requested`` instead of ending the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        del frame
        if not self.requested:
            logging.warning(
                "Received signal %d: saving a checkpoint after the current loop", signum
            )
        self.requested = True

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False
