"""The selection set of a record source: per-class hash thresholds from one pass over labels.

A record source (``input_pipeline/records.py``) keys each training record
``"<file base name>/<index in file>"`` (the base name: the same shards under
another ``--data_dir`` or bucket hold out the same records) and holds out
those whose hash is at most their class's threshold (``input_pipeline/
selection.py``). The thresholds need every training label: one pass that
reads every training record but decodes no image (for ImageNet, all 140 GB
of its training files), made the first time a stream needs it, logged with
its time, and remembered in ``~/.cache/conadv/selection``, keyed by the
table's format, the data's fingerprint, the training files (names, and their
records where the metadata has them), the rule, the classes and the label
offset. A remembered table that lists other files is refused. The table also
keeps, per file, its records and how many of them are held out, so that a
resumed run knows an input pipeline's epoch without reading it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from input_pipeline.errors import DataError
from input_pipeline.selection import Selection

#: Where tables are remembered (``~`` expanded when used).
CACHE_DIR = os.path.join("~", ".cache", "conadv", "selection")
#: Records hashed at once in the pass.
_PASS_BATCH = 4096


def base_name(filename: tf.Tensor) -> tf.Tensor:
    """A file path's last component (``/`` separated, local or ``gs://``)."""
    return tf.strings.regex_replace(filename, r"^.*/", "")


def record_key(filename: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """``"<file base name>/<index in file>"``: where the record is stored, whatever its path."""
    return tf.strings.join([base_name(filename), tf.strings.as_string(index)], "/")


@dataclasses.dataclass(frozen=True)
class SelectionTable:
    """Per class the largest held-out hash (−1: none); per file base name
    ``[records, held out]``."""

    thresholds: np.ndarray
    files: dict[str, tuple[int, int]]

    @property
    def held(self) -> int:
        return sum(held for _, held in self.files.values())

    @property
    def records(self) -> int:
        return sum(records for records, _ in self.files.values())

    def _counts(self, filename) -> tuple[int, int]:
        name = os.path.basename(os.fspath(filename))
        if name not in self.files:  # table_for checks the files; this is a bug if reached
            raise DataError(f"the selection table has no training file {name}")
        return self.files[name]

    def kept(self, files) -> int:
        """Training records left in these files (paths or base names) once held out."""
        return sum(records - held for records, held in map(self._counts, files))

    def held_in(self, filename) -> int:
        """Records held out of one file (path or base name)."""
        return self._counts(filename)[1]

    def held_out(self, selection: Selection, filename, index, label) -> tf.Tensor:
        """In the graph: whether one record (file name, index in file, label) is held out."""
        thresholds = tf.constant(self.thresholds, tf.int64)
        label = tf.clip_by_value(tf.cast(label, tf.int64), 0, len(self.thresholds) - 1)
        hashed = selection.hashes(record_key(filename, index))
        return hashed <= tf.gather(thresholds, label)

    def to_json(self) -> dict:
        files = {name: list(counts) for name, counts in self.files.items()}
        return {"thresholds": self.thresholds.tolist(), "files": files}

    @classmethod
    def from_json(cls, value: dict) -> SelectionTable:
        files = {name: (int(r), int(h)) for name, (r, h) in value["files"].items()}
        return cls(np.asarray(value["thresholds"], np.int64), files)


def compute(selection: Selection, records: tf.data.Dataset, label_fn, num_classes: int, files=()):
    """The table of one pass over ``(file name, index in file, record)``; ``label_fn``
    parses a record's 0-based label (only the label); ``files``: base names listed even
    if they hold no record."""

    def keyed(filename, index, record):
        return base_name(filename), selection.hashes(record_key(filename, index)), label_fn(record)

    ds = records.map(keyed, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    names, hashes, labels = [], [], []
    for name, hashed, label in ds.batch(_PASS_BATCH).prefetch(2):
        names.append(name.numpy())
        hashes.append(hashed.numpy())
        labels.append(label.numpy())
    names = np.concatenate(names) if names else np.zeros([0], object)
    hashes = np.concatenate(hashes) if hashes else np.zeros([0], np.int64)
    labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros([0], np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"label {labels[bad[0]]} (after offset) outside [0, --num_classes={num_classes}) in "
            f"file {names[bad[0]].decode()}; check --one_based_labels and --num_classes"
        )
    thresholds = selection.thresholds(hashes, labels, num_classes)
    held = hashes <= thresholds[labels]
    files = {name: (0, 0) for name in files}
    unique, inverse = np.unique(names, return_inverse=True)
    per_file = np.bincount(inverse, minlength=len(unique))
    held_per_file = np.bincount(inverse, weights=held, minlength=len(unique))
    for name, count, held_count in zip(unique, per_file, held_per_file):
        files[name.decode()] = (int(count), int(held_count))
    return SelectionTable(thresholds, files)


#: The table's format and the keys' and hash's definition: a change makes new tables.
FORMAT = 1


def _cache_path(source) -> str:
    """The table's file: keyed by the format, the data's fingerprint and training files
    (names, and records where the metadata has them), the rule, classes and label offset."""
    key = {
        "format": FORMAT,
        "fingerprint": source.fingerprint(),
        "files": source.selection_layout(),
        "rule": source.selection.describe(),
        "classes": source.num_classes,
        "label_offset": getattr(source, "label_offset", 0),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(CACHE_DIR), f"{digest}.json")


def table_for(source, records: tf.data.Dataset, label_fn) -> SelectionTable:
    """The source's table: remembered, or computed from ``records`` (every training record,
    unfiltered) and remembered. Stops if it holds out another number than the source's
    ``num_selection_examples``."""
    path = _cache_path(source)
    table = None
    if os.path.exists(path):
        with open(path) as f:
            table = SelectionTable.from_json(json.load(f))
    else:
        logging.info(
            "Reading the training labels to choose the selection set (once per machine; "
            "remembered in %s)",
            os.path.dirname(path),
        )
        start = time.time()
        listed = [e[0] if isinstance(e, (list, tuple)) else e for e in source.selection_layout()]
        table = compute(source.selection, records, label_fn, source.num_classes, listed)
        logging.info("Read %d training labels in %.0f s", table.records, time.time() - start)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.{os.getpid()}.tmp"  # workers may write at once
            with open(temporary, "w") as f:
                json.dump(table.to_json(), f)
            os.replace(temporary, path)
        except OSError as error:  # a read-only home: compute again next time
            logging.warning("Could not remember the selection set in %s: %s", path, error)
    expected = source.num_selection_examples
    total = source.num_train_examples + expected
    layout = source.selection_layout()
    names = {entry[0] if isinstance(entry, (list, tuple)) else entry for entry in layout}
    known = {entry[0]: entry[1] for entry in layout if isinstance(entry, (list, tuple))}
    if set(table.files) != names or any(table.files[n][0] != r for n, r in known.items()):
        raise DataError(
            f"--selection_examples: the selection table {path} lists other training files "
            f"than --dataset={source.name} has; delete it to read the labels again"
        )
    if table.records != total:
        raise DataError(
            f"--selection_examples: the training files hold {table.records} records, not the "
            f"{total} --dataset={source.name} expects; "
            + (
                "--dataset=imagenet is the full ImageNet training split: convert other "
                "record sets with python -m input_pipeline.convert (--dataset=folder)"
                if source.name == "imagenet"
                else "convert the files again (counts.json)"
            )
        )
    if table.held != expected:
        raise DataError(
            f"--selection_examples: {table.held} training records hash at or below their "
            f"class's threshold, not {expected} (a hash collision); choose another "
            "--selection_seed"
        )
    return table
