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
all: its client retries an unanswered dispatcher without a deadline (an
exact-mode reader keeps reading from its worker, a fast-mode one waits
forever for the next epoch's splits; measured), and the dispatcher's
``client_timeout_ms`` is the dispatcher's own view of its clients. So
``DispatcherWatch`` asks the dispatcher itself, with the tf.data service's own
RPC (``data_service.dispatcher_answers``: a hung dispatcher whose port still
accepts connections does not answer it), and a dispatcher silent for
``--peer_timeout`` seconds stops the worker in one line (exit
``DISPATCHER_EXIT_CODE``; ``os._exit``: the training thread may be blocked in
the input, and the checkpoints on disk are complete).

A failure is a lost peer only when TensorFlow's error says so (a collective
aborted, the coordination service, or a task other than this one named as
the remote end); any other ``OpError`` (a file system's hiccup, a bad
record) passes through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback as traceback_lib

import tensorflow as tf

from conadv.run import run_logging
from conadv.run.checkpoints import resumable_step
from input_pipeline import data_service

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
    tf.errors.InternalError,
)
#: What only a lost peer's error says (any of them is enough).
_PEER_MARKERS = ("Collective ops is aborted", "coordination service", "heartbeat")
_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
#: Where TensorFlow names the tasks it blames, from the most to the least specific.
_BLAMED = (
    re.compile(r"unhealthy[^\n]*\n((?:/job:\S+\n?)+)"),  # missed heartbeats
    re.compile(r"timed out task names:\s*\n((?:/job:\S+\n?)+)"),  # start barrier
    re.compile(r"remote target (/job:\S+)"),  # a failed RPC to that task
)


class ClusterError(RuntimeError):
    """A worker of the cluster was lost or never came up; the message is one line."""


def _lost_tasks(text: str, own) -> list[tuple[str, int]]:
    """The tasks ``text`` blames (not this worker itself), in the order named. TensorFlow
    names a lost or missing worker 0, the coordination service's leader, the same way
    (tests/test_multi_worker.py: no guess is needed for it)."""
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


def is_peer_failure(error: BaseException, own=None) -> bool:
    """Whether ``error`` is how TensorFlow reports a lost or unreachable peer: a
    collective aborted, the coordination service's word, or a failed RPC whose remote
    end is another task. An ``UnavailableError`` of anything else (a file system) is not."""
    if not isinstance(error, PEER_ERRORS):
        return False
    text = str(error)
    if any(marker.lower() in text.lower() for marker in _PEER_MARKERS):
        return True
    return bool(_lost_tasks(text, own))


def _log_to_file(message: str, error: BaseException):
    """The whole error into the log file, not the console. Before the log file is opened
    (the cluster starting), into the file TensorFlow's C++ lines go to (``main.py``)."""
    record = logging.LogRecord("conadv", logging.ERROR, __file__, 0, message, None, None)
    record.exc_info = (type(error), error, error.__traceback__)
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for handler in handlers:
        handler.handle(record)
    native = run_logging.native_log_path()
    if not handlers and native is not None:
        text = "".join(traceback_lib.format_exception(type(error), error, error.__traceback__))
        with open(native, "a") as f:
            f.write(f"{message}\n{text}")


def resumes_from(model_dir: str) -> str:
    """Where a restart resumes: the checkpoint every worker has its state for
    (``checkpoints.resumable_step``, as the restart decides it)."""
    step = resumable_step(model_dir)
    if step < 0:
        return "the run starts again from step 0 (no checkpoint yet)"
    return f"the run resumes from ckpt-{step}, its latest complete checkpoint"


def _log_name() -> str:
    """The file the whole error went to (``_log_to_file``)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return run_logging.native_log_path() or run_logging.LOG_FILE


class PeerWatch:
    """Turns a lost peer inside its ``with`` block into ``ClusterError``.

    ``step`` (settable once the trainer exists) returns the step the host last
    saw: a Python number, since after a failure reading a device variable can
    block. Outside a multi-worker run or a TPU pod (several hosts) it passes
    every error through.
    """

    def __init__(self, strategy, model_dir: str, multi_worker: bool, step=None):
        self.resolver = getattr(strategy, "cluster_resolver", None)
        self.model_dir = model_dir
        self.step = step
        # A TPU pod's host programs talk to every TPU worker: one gone fails them alike
        # (not testable here: no TPU). A single-host TPU has no peer to lose.
        pod = isinstance(strategy, tf.distribute.TPUStrategy) and (
            getattr(strategy.extended, "num_hosts", 1) > 1
        )
        self.active = multi_worker or pod

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        own = _own_task(self.resolver)
        if not self.active or error is None or not is_peer_failure(error, own):
            return False
        try:
            step = f"at step {self.step()}" if self.step is not None else "while starting"
        except Exception:  # noqa: BLE001 - the step is a courtesy; the line must be said
            step = "during training"
        lost = _describe(_lost_tasks(str(error), own), self.resolver)
        _log_to_file(f"lost {lost} {step}", error)
        message = (
            f"lost {lost} {step}; this worker stopped too. Restart every worker with the "
            f"same command: {resumes_from(self.model_dir)} (the whole error is in "
            f"{_log_name()})"
        )
        raise ClusterError(message) from None


def start_failure(error: BaseException, resolver, timeout: float) -> ClusterError | None:
    """The one-line ``ClusterError`` for a cluster that did not come up, or None when
    ``error`` is something else."""
    own = _own_task(resolver)
    if not is_peer_failure(error, own):
        return None
    lost = _describe(_lost_tasks(str(error), own), resolver)
    _log_to_file(f"{lost} never registered", error)
    return ClusterError(
        f"the cluster did not come up within --cluster_start_timeout={timeout:g} s: "
        f"{lost} never registered. Start every worker in TF_CONFIG with the same command "
        f"(the whole error is in {_log_name()})"
    )


class DispatcherWatch:
    """While its ``with`` block runs, stops the process in one line once the tf.data
    service dispatcher at ``service`` (``grpc://HOST:PORT``; None: no watch) has not
    answered for ``timeout`` seconds. ``step`` returns the host's last step (a Python
    number, read from this thread: a device variable could block it)."""

    def __init__(self, service, model_dir: str, step, timeout: float, interval: float = 1.0):
        self.service, self.model_dir, self.step = service, model_dir, step
        self.timeout, self.interval = timeout, interval
        self._stop = threading.Event()
        self._answered = time.monotonic()

    def _probe(self):
        """Asks the dispatcher again and again; each answer is noted (a call to a silent
        dispatcher blocks: the watch below times it)."""
        while not self._stop.is_set():
            try:
                data_service.dispatcher_answers(self.service)
            except Exception as error:  # noqa: BLE001 - the watch, not the run, gives up
                logging.warning("Not watching the tf.data service dispatcher: %s", error)
                self._answered = float("inf")
                return
            self._answered = time.monotonic()
            self._stop.wait(self.interval)

    def _watch(self):
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._answered < self.timeout:
                continue
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
            self._answered = time.monotonic()
            for target in (self._probe, self._watch):
                threading.Thread(target=target, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False
