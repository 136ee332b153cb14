"""A cluster that loses a worker, or never becomes whole, stops every worker in one line.

With ``multi_worker_mirrored`` every worker takes part in every step's
collectives, so a worker that is gone stops the others. TensorFlow's
coordination service notices it: ``official/distribute.py`` configures it
(``--peer_timeout``, ``--cluster_start_timeout``) before the strategy exists.

- *Killed* (the process ends, its connections close): the next collective
  fails at once on every survivor ("Connection reset by peer").
- *Unreachable* (a hung host, a cut network, a TPU VM preempted without
  SIGTERM): the coordination service misses its heartbeats for
  ``--peer_timeout`` seconds, reports it to every other worker and aborts
  their collectives.
- *Never started*: each worker registers with the service (on worker 0, or
  the chief) and waits at a barrier for all of them, at most
  ``--cluster_start_timeout`` seconds; then the strategy's construction fails
  naming the tasks that are missing.

TensorFlow reports these as an ``OpError`` whose text names the task
(``/job:worker/replica:0/task:1``) among a page of internals. ``PeerWatch``
(around the training loop) and ``start_failure`` (around the strategy's
construction) turn it into ``ClusterError``: one line naming the task and
its address, the step, the checkpoint a restart resumes from and that every
worker must be restarted; ``main.py`` prints it and exits with ``EXIT_CODE``.
The whole error, TensorFlow's C++ lines included, is in the worker's
``log.txt`` (``run_logging.native_stderr_to``).

A tf.data service dispatcher that goes away is not reported by TensorFlow at
all: an exact-mode reader keeps reading from its worker, a fast-mode one
waits forever for the next epoch's splits (measured). TensorFlow has no
client-side timeout for it, so ``DispatcherWatch`` connects to the
dispatcher's port every few seconds while training runs; unreachable for
``--peer_timeout`` seconds, it says so in one line and ends the process
(exit ``DISPATCHER_EXIT_CODE``: the training thread may be blocked in the
input, and the checkpoints on disk are complete).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse

import tensorflow as tf

#: The exit status of a run stopped by a lost or missing worker (BUILD.md).
EXIT_CODE = 4
#: The exit status of a run whose tf.data service dispatcher went away (BUILD.md).
DISPATCHER_EXIT_CODE = 5

#: The errors a collective, or the coordination service, raises when a peer is gone.
PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)
_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
#: Where TensorFlow names the tasks it blames, from the most to the least specific.
_BLAMED = (
    re.compile(r"unhealthy[^\n]*\n((?:/job:\S+\n?)+)"),  # missed heartbeats
    re.compile(r"timed out task names:\s*\n((?:/job:\S+\n?)+)"),  # start barrier
    re.compile(r"remote target (/job:\S+)"),  # a failed RPC to that task
)


class ClusterError(RuntimeError):
    """A worker of the cluster was lost or never came up; the message is one line."""


def _lost_tasks(text: str, own: tuple[str, int] | None) -> list[tuple[str, int]]:
    """The tasks ``text`` blames (not this worker itself), in the order named."""
    for pattern in _BLAMED:
        tasks = []
        for match in pattern.finditer(text):
            for job, index in _TASK.findall(match.group(1)):
                task = (job, int(index))
                if task != own and task not in tasks:
                    tasks.append(task)
        if tasks:
            return tasks
    return []


def _describe(tasks: list[tuple[str, int]], resolver) -> str:
    if not tasks:
        return "a worker (TensorFlow did not say which)"
    spec = resolver.cluster_spec() if resolver is not None else None
    names = []
    for job, index in tasks:
        address = ""
        if spec is not None and job in spec.jobs:
            try:
                address = f" ({spec.task_address(job, index)})"
            except (ValueError, KeyError):
                pass
        names.append(f"{job} {index}{address}")
    return ", ".join(names)


def _own_task(resolver) -> tuple[str, int] | None:
    if resolver is None or resolver.task_type is None:
        return None
    return resolver.task_type, int(resolver.task_id or 0)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is how TensorFlow reports a lost or unreachable peer."""
    if isinstance(error, PEER_ERRORS):
        return True
    text = str(error)
    return isinstance(error, tf.errors.OpError) and (
        "Collective ops is aborted" in text or "coordination" in text.lower()
    )


def _log_to_file(message: str, error: BaseException):
    """The whole error into the log file (not the console: its handler is the file's)."""
    record = logging.LogRecord("conadv", logging.ERROR, __file__, 0, message, None, None)
    record.exc_info = (type(error), error, error.__traceback__)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def resumes_from(model_dir: str) -> str:
    """Where a restart resumes: the run's latest complete checkpoint, by name."""
    path = tf.train.latest_checkpoint(model_dir)
    if path is None:
        return "the run starts again from step 0 (no checkpoint yet)"
    return f"the run resumes from {path.rsplit('/', 1)[-1]}, its latest complete checkpoint"


class PeerWatch:
    """Turns a lost peer inside its ``with`` block into ``ClusterError``.

    ``step`` returns the current step (read after the failure: the step the
    lost collective belonged to). Outside a multi-worker or TPU run it passes
    every error through.
    """

    def __init__(self, strategy, model_dir: str, step, multi_worker: bool):
        self.resolver = getattr(strategy, "cluster_resolver", None)
        self.model_dir = model_dir
        self.step = step
        # A TPU's host program talks to every TPU worker: one gone fails it alike
        # (not testable here: no TPU).
        self.active = multi_worker or isinstance(strategy, tf.distribute.TPUStrategy)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not self.active or error is None or not is_peer_failure(error):
            return False
        try:
            step = f"at step {self.step()}"
        except Exception:  # noqa: BLE001 - the step is a courtesy; the line must be said
            step = "during training"
        lost = _describe(_lost_tasks(str(error), _own_task(self.resolver)), self.resolver)
        message = (
            f"lost {lost} {step}; this worker stopped too. Restart every worker with the "
            f"same command: {resumes_from(self.model_dir)} (the whole error is in log.txt)"
        )
        _log_to_file(message, error)
        raise ClusterError(message) from None


def start_failure(error: BaseException, resolver, timeout: float) -> ClusterError | None:
    """The one-line ``ClusterError`` for a cluster that did not come up, or None when
    ``error`` is something else."""
    if not is_peer_failure(error):
        return None
    lost = _describe(_lost_tasks(str(error), _own_task(resolver)), resolver)
    message = (
        f"the cluster did not come up within --cluster_start_timeout={timeout:g} s: "
        f"{lost} never registered. Start every worker in TF_CONFIG with the same command "
        "(the whole error is in log.txt)"
    )
    _log_to_file(message, error)
    return ClusterError(message)


class DispatcherWatch:
    """While its ``with`` block runs, stops the process in one line once the tf.data
    service dispatcher at ``service`` (``grpc://HOST:PORT``; None: no watch) has not
    accepted a connection for ``timeout`` seconds."""

    def __init__(self, service, model_dir: str, step, timeout: float, interval: float = 2.0):
        self.service, self.model_dir, self.step = service, model_dir, step
        self.timeout, self.interval = timeout, interval
        self._stop = threading.Event()
        self._thread = None

    def _reachable(self, host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=self.interval):
                return True
        except OSError:
            return False

    def _watch(self):
        address = urllib.parse.urlparse(self.service)
        since = None
        while not self._stop.wait(self.interval):
            if self._reachable(address.hostname, address.port):
                since = None
                continue
            since = since or time.time()
            if time.time() - since < self.timeout and not self._stop.is_set():
                continue
            if self._stop.is_set():
                return
            try:
                step = f"at step {self.step()}"
            except Exception:  # noqa: BLE001 - the line must be said
                step = "during training"
            message = (
                f"the tf.data service dispatcher {self.service} has not answered for "
                f"{self.timeout:g} s {step}; this worker stopped. Restart the dispatcher and "
                f"its workers, then every worker with the same command: "
                f"{resumes_from(self.model_dir)}"
            )
            _log_to_file(message, RuntimeError(message))
            print(f"error: {message}", file=sys.stderr, flush=True)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(DISPATCHER_EXIT_CODE)  # the training thread may be blocked in the input

    def __enter__(self):
        if self.service:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False
