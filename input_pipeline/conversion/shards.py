"""One shard: written under a temporary name and renamed when complete, or proved
already written from the same inputs and skipped.

A shard ``NAME`` is a TFRecord file of ``tf.train.Example``s. Beside it,
``.conversion/NAME.json`` records the plan it was made from (a hash of its
inputs' paths, sizes, modification times, labels and names, and of the
encoding), its size, its record count and the files re-encoded or skipped. A
restarted conversion skips the shard only when the file has that size and the
plan hash of the inputs it would read now is the recorded one.

A shard's bytes depend on its inputs alone, so any number of workers writes
the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

import tensorflow as tf

from input_pipeline.conversion import images

#: Changes when the records' content changes, so older shards are rewritten.
FORMAT = 1
STATE_DIR = ".conversion"


class Item(NamedTuple):
    path: str
    label: int  # as stored (0-based, or 1-based with --one_based_labels)
    filename: str
    synset: str
    text: str


class Task(NamedTuple):
    name: str
    items: list[Item]


class Result(NamedTuple):
    name: str
    count: int
    reencoded: list  # [path, reason]
    skipped: list  # [path, reason]
    resumed: bool = False


def plan_hash(task: Task) -> str:
    """What the shard is made from: its name, inputs (path, size, mtime, label, names)
    and the encoding."""
    digest = hashlib.sha256(json.dumps([FORMAT, images.QUALITY, task.name]).encode())
    for item in task.items:
        try:
            stat = os.stat(item.path)
            seen = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            seen = None
        digest.update(json.dumps([*item, seen]).encode())
    return digest.hexdigest()


def _state_path(out: str, name: str) -> str:
    return os.path.join(out, STATE_DIR, name + ".json")


def completed(task: Task, out: str) -> Result | None:
    """The result of an earlier, complete write of this same shard, or None."""
    shard, state = os.path.join(out, task.name), _state_path(out, task.name)
    if not (os.path.exists(shard) and os.path.exists(state)):
        return None
    with open(state) as f:
        record = json.load(f)
    if record.get("plan") != plan_hash(task) or record.get("bytes") != os.path.getsize(shard):
        return None
    return Result(task.name, record["count"], record["reencoded"], record["skipped"], True)


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def example(item: Item, image: images.Prepared) -> bytes:
    feature = {
        "image/encoded": _bytes(image.data),
        "image/format": _bytes(b"JPEG"),
        "image/height": _int(image.height),
        "image/width": _int(image.width),
        "image/class/label": _int(item.label),
        "image/class/synset": _bytes(item.synset.encode()),
        "image/filename": _bytes(item.filename.encode()),
    }
    if item.text:
        feature["image/class/text"] = _bytes(item.text.encode())
    proto = tf.train.Example(features=tf.train.Features(feature=feature))
    # Map fields in key order: the default order follows a per-process string hash.
    return proto.SerializeToString(deterministic=True)


def write(task: Task, out: str, progress=None) -> Result:
    """Writes the shard; ``progress(n)`` is told of every image read."""
    plan = plan_hash(task)
    final = os.path.join(out, task.name)
    temporary = os.path.join(out, f".{task.name}.partial")
    reencoded, skipped, count = [], [], 0
    with tf.io.TFRecordWriter(temporary) as writer:
        for item in task.items:
            try:
                with open(item.path, "rb") as f:
                    data = f.read()
                image = images.prepare(data, item.filename)
            except (OSError, images.UnreadableImageError) as error:
                skipped.append([item.path, str(error) or type(error).__name__])
            else:
                if image.reencoded:
                    reencoded.append([item.path, image.reencoded])
                writer.write(example(item, image))
                count += 1
            if progress is not None:
                progress(1)
    record = {
        "plan": plan,
        "bytes": os.path.getsize(temporary),
        "count": count,
        "reencoded": reencoded,
        "skipped": skipped,
    }
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    state = _state_path(out, task.name)
    with open(state + ".partial", "w") as f:
        json.dump(record, f)
    os.replace(temporary, final)
    os.replace(state + ".partial", state)
    return Result(task.name, count, reencoded, skipped)
