"""Where a run's log lines go: the console keeps what a person reads, the file keeps all.

By default the console shows the run's progress lines, evaluations, the
project's own log lines, and every warning and error — but not the INFO
chatter of TensorFlow, Keras and absl themselves (a line per checkpoint
shard, strategy set-up, ...). ``--verbosity=1`` (absl's flag) shows it
again. Every Python log record at INFO or above, TensorFlow's included, also
goes to ``<model_dir>/log.txt``. TensorFlow's C++ INFO lines are silenced by
``TF_CPP_MIN_LOG_LEVEL=1`` unless the environment sets it (``main.py``); the
notices its C++ libraries print while loading (before any log setting
applies) are captured by ``import_tensorflow_quietly`` and go to the file
too, except warnings and errors, which are shown.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile

from absl import logging as absl_logging

LOG_FILE = "log.txt"
LIBRARIES = ("tensorflow", "keras", "tf_keras", "absl", "tensorboard")
_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


#: A C++ INFO line (absl format), and the notice absl prints before it is set up.
_CPP_INFO = re.compile(r"^I\d{4} ")
_CPP_BOILERPLATE = "WARNING: All log messages before absl::InitializeLog() is called"
_import_notices: list[str] = []


def from_library(record: logging.LogRecord) -> bool:
    """Whether a record was logged from TensorFlow's, Keras' or absl's own code.

    Decided by the caller's file, not the logger's name: TensorFlow and this
    project both log through absl's logger.
    """
    parts = os.path.normpath(record.pathname).split(os.sep)
    return "site-packages" in parts and any(lib in parts for lib in LIBRARIES)


def import_tensorflow_quietly():
    """Imports TensorFlow with its load-time C++ notices kept for the log file.

    Warnings and errors among them are printed as usual; INFO notices (such
    as oneDNN's) are printed only when absl's ``--verbosity`` is raised on
    the command line.
    """
    if "tensorflow" in sys.modules or _verbosity_raised(sys.argv):
        import tensorflow  # noqa: F401

        return
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines()
    for line in lines:
        if _CPP_INFO.match(line) or line.startswith(_CPP_BOILERPLATE):
            _import_notices.append(line)
        else:
            print(line, file=sys.stderr)


def _verbosity_raised(argv) -> bool:
    for index, arg in enumerate(argv):
        value = None
        if arg.startswith(("--verbosity=", "-v=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--verbosity", "-v") and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None:
            try:
                return int(value) > 0
            except ValueError:
                return False
    return False


class ConsoleFilter(logging.Filter):
    """Drops libraries' records below WARNING (unless absl's verbosity is raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or absl_logging.get_verbosity() > absl_logging.INFO:
            return True
        return not from_library(record)


def configure_console():
    """One copy of every record on the console, through absl's handler, filtered."""
    tf_logger = logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)  # records reach absl's handler through the root
    tf_logger.propagate = True
    absl_handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, ConsoleFilter) for f in absl_handler.filters):
        absl_handler.addFilter(ConsoleFilter())


#: What the tee below still shows on the console of TensorFlow's C++ lines: what a
#: process dies of (absl's FATAL lines and CHECK failures, std::terminate, a fatal Python
#: error, NCCL's warnings); everything else (a lost peer's pages) only goes to the file.
CONSOLE_NATIVE = (
    r"^(F\d{4} |\*\*\* |.*Check failed|terminate called|Fatal Python error|.*NCCL WARN)"
)

#: The tee: a process of its own, so the lines a crashing process writes last still
#: arrive (it reads until the pipe closes, also after its writer was killed).
_TEE = """
import re, sys
shown = re.compile(sys.argv[2])
with open(sys.argv[1], "ab", buffering=0) as log:
    for line in sys.stdin.buffer:
        log.write(line)
        if shown.match(line.decode(errors="replace")):
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
"""

_native_log: list = []  # [path, the tee process]


def native_stderr_to(directory: str) -> str:
    """From now on what TensorFlow's C++ code writes to stderr goes to ``directory``'s
    ``log.txt`` (appended; a local one for a remote directory, as ``add_log_file``), and
    only its fatal lines (``CONSOLE_NATIVE``) also to the console; Python's
    ``sys.stderr`` (absl's console handler, the one-line errors) stays the console.
    Returns the file's path.

    For multi-worker runs, whose C++ layers print pages when a peer is lost
    (``conadv/run/cluster.py``): the console keeps the one line. Call before the
    strategy is built.
    """
    path = os.path.join(local_log_dir(directory), LOG_FILE)
    sys.stderr.flush()
    console = os.dup(2)
    tee = subprocess.Popen(
        [sys.executable, "-I", "-c", _TEE, path, CONSOLE_NATIVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=console,
    )
    os.dup2(tee.stdin.fileno(), 2)
    tee.stdin.close()  # fd 2 holds the pipe: it closes when this process ends
    sys.stderr = os.fdopen(console, "w", buffering=1, encoding="utf-8", errors="replace")
    absl_logging.get_absl_handler().python_handler.setStream(sys.stderr)
    _native_log[:] = [path, tee]  # the tee kept: it ends when this process does
    return path


def native_log_path() -> str | None:
    """The file TensorFlow's C++ lines go to (``native_stderr_to``), or None."""
    return _native_log[0] if _native_log else None


def local_log_dir(model_dir: str) -> str:
    """Where ``model_dir``'s log is written, created: itself, or for a remote file system
    (``gs://…``; Python's logging writes local files only) a local directory of that name."""
    if "://" in model_dir:
        model_dir = os.path.join(tempfile.gettempdir(), "conadv_logs", model_dir.split("://", 1)[1])
    os.makedirs(model_dir, exist_ok=True)
    return model_dir


def remove_log_file(path: str):
    """Stops writing ``path`` (added by ``add_log_file``) and closes it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(
            path
        ):
            root.removeHandler(handler)
            handler.close()


def add_log_file(model_dir: str) -> str:
    """Appends every record at INFO or above to ``<model_dir>/log.txt``; returns its path.

    A ``--model_dir`` on a remote file system (``gs://…``) gets the log in a
    local directory instead (Python's logging writes local files only); the
    run's first lines say where.
    """
    path = os.path.join(local_log_dir(model_dir), LOG_FILE)
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(
            path
        ):
            return path
    if _import_notices:
        with open(path, "a") as f:
            f.write("\n".join(_import_notices) + "\n")
        _import_notices.clear()
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return path
