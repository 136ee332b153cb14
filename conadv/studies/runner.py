"""Trains a sweep's runs with ``main.py``, one process each, N at a time.

A run lives in ``OUT/runs/<name>``: ``run.json`` (its grid point and
configuration, written once before its first start, never rewritten),
main.py's own files (checkpoints, ``run_config.json``, TensorBoard events,
``summary.json`` when it finished) and ``console.log`` (its output, appended
at every start). A run with a ``summary.json`` is
finished and skipped; any other starts main.py on its directory, which
resumes from the latest checkpoint. So a killed sweep, started again with the
same command, redoes only what was lost.

A run whose loss or gradient went non-finite (main.py exits with status 3
and its chief writes ``diverged.json``: the message, the step, the last good
checkpoint's step) has a result too: "diverged", which a tuning sweep's
too-large learning rate legitimately gives. It is done, not a failure: the
sweep goes on, says "diverged NAME at step S: ..." and counts it, the same
command does not start it again, and it is not measured for sharpness; the
report shows it as diverged (``tuning.py``). To train it again (say, after a
fix), remove the run's directory. A run that fails otherwise — status 3
without ``diverged.json`` included — stops the sweep (``RunFailedError``).

SIGTERM or Ctrl-C stops the sweep and passes SIGTERM to the running
processes, which save a checkpoint at their current step and exit
(main.py's preemption handling). The runs are started in sessions of their
own, so the terminal's Ctrl-C (SIGINT, which main.py does not checkpoint on)
reaches the sweep only, and the sweep's SIGTERM reaches each run.

With ``sharpness``, a finished run is then measured by ``main.py --mode
sharpness`` on its directory (``sharpness/<settings>.json``), once per setting.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from conadv.studies import hparams
from conadv.studies.grid import Run

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "main.py")


def run_dir(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.name)


def is_finished(out: str, run: Run, sharpness: dict | None = None) -> bool:
    """Trained (``summary.json``) and, if ``sharpness`` (the ``--sharpness_*`` settings)
    is given, measured with those settings (``sharpness/<settings>.json``; a measurement
    with other settings stays beside it)."""
    from flags import sharpness as sharpness_flags

    directory = run_dir(out, run)
    if not os.path.exists(os.path.join(directory, "summary.json")):
        return False
    if sharpness is None:
        return True
    path = os.path.join(directory, sharpness_flags.measurement_name(sharpness))
    try:
        with open(path) as f:
            return json.load(f).get("settings") == sharpness
    except FileNotFoundError:
        return False


def divergence(out: str, run: Run) -> dict | None:
    """The run's ``diverged.json`` if it diverged and has no ``summary.json`` (a summary
    is the run's result, whatever else its directory holds) and no checkpoint later than
    its last good one, else None."""
    from conadv.run.nonfinite import DIVERGED_FILE

    directory = run_dir(out, run)
    if os.path.exists(os.path.join(directory, "summary.json")):
        return None
    try:
        with open(os.path.join(directory, DIVERGED_FILE)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    # A divergence saves nothing past its last good checkpoint: a later checkpoint is a
    # start since (resumed by hand), so the record is stale and the run is resumed.
    last_good = record.get("last_good_checkpoint_step")
    steps = [
        int(name[len("ckpt-") : -len(".index")])
        for name in os.listdir(directory)
        if name.startswith("ckpt-") and name.endswith(".index")
    ]
    if steps and (last_good is None or max(steps) > last_good):
        return None
    return record


class RunFailedError(RuntimeError):
    """A run's main.py exited with an error; the message is one line."""


class Progress:
    """One line per started or finished run: a bar over runs and an ETA from the rate
    at which this invocation has finished runs (``parallel`` of them at a time: that rate
    already counts them, so it is not divided again)."""

    def __init__(self, total: int, done: int, parallel: int, stream=None, clock=time.time):
        self.total, self.done, self.parallel = total, done, parallel
        self.clock = clock
        self.start = clock()
        self.trained = 0
        self.diverged = 0
        self.stream = stream or sys.stdout

    def _bar(self, width: int = 24) -> str:
        filled = round(width * self.done / max(self.total, 1))
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def eta(self) -> str:
        if not self.trained:
            return "unknown"
        seconds_per_run = (self.clock() - self.start) / self.trained
        remaining = (self.total - self.done) * seconds_per_run
        return str(datetime.timedelta(seconds=round(remaining)))

    def line(self, message: str):
        print(
            f"{self._bar()} {self.done}/{self.total} runs | ETA {self.eta()} | {message}",
            file=self.stream,
            flush=True,
        )

    def finished(self, name: str, seconds: float, summary: dict):
        self.done += 1
        self.trained += 1
        top1 = summary.get("eval_top1")
        top1 = "n/a" if top1 is None else f"{top1:.4f}"
        self.line(f"finished {name} in {seconds:.0f} s: eval top-1 {top1}")

    def diverged_run(self, name: str, seconds: float, record: dict):
        self.done += 1
        self.trained += 1
        self.diverged += 1
        self.line(
            f"diverged {name} at step {record.get('step')}: {record.get('message')} "
            f"(after {seconds:.0f} s; done: remove its directory to train it again)"
        )


def _write_record(out: str, run: Run) -> str:
    """``run.json``: written once, when the run is created, and never rewritten (the
    record is the run's own, whichever sweep trains or skips it later); a record of
    another identity under this name is refused."""
    directory = run_dir(out, run)
    path = os.path.join(directory, "run.json")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        # Written whole under a name of its own, then linked: of two sweeps creating
        # the run at once, the first record stands and the second is not written.
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".run.json.")
        with os.fdopen(handle, "w") as f:
            json.dump(run.record(), f, indent=2)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            os.remove(temporary)
    with open(path) as f:
        recorded = json.load(f).get("identity")
    if recorded != run.identity:
        raise RunFailedError(
            f"{path} records identity {recorded}, not {run.identity}: the directory "
            "holds another run; move it out of the sweep's --out"
        )
    return directory


def _start(out: str, run: Run, main_flags: list[str], sharpness: dict | None) -> subprocess.Popen:
    """main.py on the run's directory: training if it has no summary yet, else (with
    ``sharpness``, the ``--sharpness_*`` settings) the measurement of its weights."""
    directory = _write_record(out, run)
    if sharpness is not None and is_finished(out, run):
        # The run's configuration comes from its run_config.json.
        measure = [f"--{name}={value!r}" for name, value in sharpness.items()]
        command = [sys.executable, MAIN, "--mode=sharpness", f"--model_dir={directory}", *measure]
    else:
        # --num_replicas: the count in the run's identity, which main.py then enforces.
        replicas = f"--num_replicas={dict(run.config)['replicas']}"
        command = [
            sys.executable,
            MAIN,
            *main_flags,
            *run.flags(),
            replicas,
            f"--model_dir={directory}",
        ]
    log = open(os.path.join(directory, "console.log"), "a")  # noqa: SIM115 (closed in wait)
    log.write(f"+ {' '.join(command[1:])}\n")
    log.flush()
    # A session of its own: the terminal's Ctrl-C goes to the sweep, which sends SIGTERM.
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    proc.started = time.time()
    return proc


def _last_line(path: str) -> str:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def train_all(
    out: str,
    runs: list[Run],
    main_flags: list[str],
    parallel: int = 1,
    sharpness: dict | None = None,
) -> dict:
    """Trains (and with ``sharpness``, the ``--sharpness_*`` settings, measures) every
    unfinished run; returns {name: summary} of all runs, a diverged run's being its
    ``diverged.json`` with ``"diverged": True`` (it is done: neither trained again nor
    measured).

    Raises ``RunFailedError`` naming the first run that failed, after the
    others in flight have finished.
    """
    diverged = [run for run in runs if divergence(out, run) is not None]
    pending = [r for r in runs if r not in diverged and not is_finished(out, r, sharpness)]
    for run in runs:
        if run in diverged:
            _write_record(out, run)  # the record is this sweep's run, or a one-line error
        elif run not in pending:  # its session, if a kill came first
            hparams.write_session(_write_record(out, run), run, read_summary(out, run))
    progress = Progress(len(runs), len(runs) - len(pending), parallel)
    skipped = len(runs) - len(pending) - len(diverged)
    if skipped:
        progress.line(f"{skipped} finished run(s) skipped")
    if diverged:
        progress.line(
            f"{len(diverged)} diverged run(s) skipped (remove a run's directory to train it again)"
        )
    running: dict[Run, subprocess.Popen] = {}
    started: dict[Run, float] = {}  # training and measuring count as one run's time
    failures = []
    measured: set[Run] = set()

    def stop(signum, _frame):
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            proc.wait()
        raise SystemExit(f"sweep stopped by signal {signum}; run the same command to resume")

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < parallel and not failures:
                run = pending.pop(0)
                if is_finished(out, run):
                    verb = "measuring the sharpness of"
                    measured.add(run)
                else:
                    verb = "resumed" if os.path.isdir(run_dir(out, run)) else "started"
                running[run] = _start(out, run, main_flags, sharpness)
                started.setdefault(run, running[run].started)
                progress.line(f"{verb} {run.name}")
            if not running:
                break
            time.sleep(0.2)
            for run, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                proc.log.close()
                del running[run]
                log = os.path.join(run_dir(out, run), "console.log")
                record = divergence(out, run) if proc.returncode == 3 else None
                if record is not None:  # its result: done, not a failure
                    progress.diverged_run(run.name, time.time() - started[run], record)
                    continue
                if proc.returncode != 0 or not is_finished(out, run):
                    failures.append(f"{run.name} failed: {_last_line(log)} (log: {log})")
                    continue
                if not is_finished(out, run, sharpness):
                    if run in measured:  # measured, yet sharpness.json says otherwise
                        failures.append(f"{run.name}: sharpness not recorded (log: {log})")
                    else:  # trained: now measure it
                        pending.insert(0, run)
                    continue
                summary = read_summary(out, run)
                hparams.write_session(run_dir(out, run), run, summary)
                progress.finished(run.name, time.time() - started[run], summary)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failures:
        raise RunFailedError(failures[0])
    return {run.name: result(out, run) for run in runs}


def result(out: str, run: Run) -> dict:
    """A done run's summary, or its ``diverged.json`` with ``"diverged": True``."""
    record = divergence(out, run)
    return read_summary(out, run) if record is None else {**record, "diverged": True}


def read_summary(out: str, run: Run) -> dict:
    with open(os.path.join(run_dir(out, run), "summary.json")) as f:
        return json.load(f)
