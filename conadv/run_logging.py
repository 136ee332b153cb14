"""Where a run's log lines go: the console keeps what a person reads, the file keeps all.

By default the console shows the run's progress lines, evaluations, the
project's own log lines, and every warning and error — but not the INFO
chatter of TensorFlow, Keras and absl themselves (a line per checkpoint
shard, strategy set-up, ...). ``--verbosity=1`` (absl's flag) shows it
again. Every Python log record at INFO or above, TensorFlow's included, also
goes to ``<model_dir>/log.txt``. TensorFlow's C++ INFO lines are silenced by
``TF_CPP_MIN_LOG_LEVEL=1`` unless the environment sets it (``main.py``).
"""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

LOG_FILE = "log.txt"
LIBRARIES = ("tensorflow", "keras", "tf_keras", "absl", "tensorboard")
_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


def from_library(record: logging.LogRecord) -> bool:
    """Whether a record was logged by TensorFlow, Keras or absl rather than by ConAdv."""
    parts = os.path.normpath(record.pathname).split(os.sep)
    return record.name.split(".")[0] in LIBRARIES or any(lib in parts for lib in LIBRARIES)


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


def add_log_file(model_dir: str) -> str:
    """Appends every record at INFO or above to ``<model_dir>/log.txt``; returns its path."""
    path = os.path.join(model_dir, LOG_FILE)
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(
            path
        ):
            return path
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return path
