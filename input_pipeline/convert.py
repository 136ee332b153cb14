"""Converts images as they ship into the TFRecords ``--dataset=folder`` and
``--dataset=imagenet`` read.

    python -m input_pipeline.convert --out DIR  (--src DIR [--val_fraction F]
        | --train_dir DIR --val_dir DIR | --imagenet_dir DIR)  [--num_workers N]

Layouts (``conversion.layouts``): one class-folder tree split by a stratified
fraction; a ``train/`` and a ``val/`` tree; raw ILSVRC2012. Labels are 0-based
indices into ``labels.txt`` (the sorted class folders) unless
``--one_based_labels``. Every record holds an RGB JPEG: other images are
re-encoded, unreadable ones skipped (``conversion_report.json`` lists both,
and ignored files); more skipped than ``--max_skipped_fraction`` fails.
Shards are written by ``--num_workers`` processes, the same bytes for any
number, and a restarted conversion keeps the shards already complete from the
same inputs. ``counts.json`` gives the examples of every shard.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys

import tensorflow as tf

from input_pipeline.conversion import layouts, parallel, shards
from input_pipeline.conversion.layouts import LayoutError as ConvertError

REPORT = "conversion_report.json"


def _example(data: bytes, label: int) -> bytes:
    """A minimal record (image bytes and label), for tests that write records by hand."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def split_items(items, val_fraction: float, seed: int):
    """Stratified: the same fraction of every class goes to validation (at least one)."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    train, val = [], []
    for label in sorted(by_class):
        group = by_class[label][:]
        rng.shuffle(group)
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and len(group) > 1:
            n_val = max(1, n_val)
        val += group[:n_val]
        train += group[n_val:]
    rng.shuffle(train)
    return train, val


def plan(images, prefix: str, count: int, offset: int, names: dict) -> list[shards.Task]:
    """``count`` shards (fewer for fewer images), image i in shard i mod count."""
    count = max(1, min(count, len(images)))
    items = [
        shards.Item(i.path, i.label + offset, i.filename, i.synset, names.get(i.synset, ""))
        for i in images
    ]
    return [shards.Task(f"{prefix}-{k:05d}-of-{count:05d}", items[k::count]) for k in range(count)]


def _check_out(out: str, tasks) -> None:
    """Shards of another conversion in ``out`` would be read with these: refuse."""
    planned = {t.name for t in tasks}
    for prefix in ("train", "validation"):
        for path in sorted(glob.glob(os.path.join(out, f"{prefix}-*"))):
            if os.path.basename(path) not in planned:
                raise ConvertError(
                    f"--out={out} holds {os.path.basename(path)}, which this conversion does "
                    "not write (another shard count or data): remove it or choose another --out"
                )


def _write_json(path: str, value) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".partial", path)


def write(
    out,
    classes,
    train,
    val,
    *,
    shards_count,
    val_shards,
    ignored=(),
    empty_classes=(),
    one_based_labels=False,
    names=None,
    num_workers=1,
    max_skipped_fraction=0.001,
    progress_seconds=10.0,
) -> dict:
    """Writes the shards, ``labels.txt``, ``conversion_report.json`` and ``counts.json``."""
    if shards_count < 1 or val_shards < 1:
        raise ConvertError(f"--shards={shards_count} and --val_shards={val_shards} must be >= 1")
    if not val:
        raise ConvertError("the validation split is empty: raise --val_fraction or add images")
    if not 0 <= max_skipped_fraction <= 1:
        raise ConvertError(f"--max_skipped_fraction={max_skipped_fraction} must be in [0, 1]")
    offset, names = int(one_based_labels), names or {}
    tasks = plan(train, "train", shards_count, offset, names)
    tasks += plan(val, "validation", val_shards, offset, names)
    os.makedirs(out, exist_ok=True)
    _check_out(out, tasks)
    results = parallel.run(tasks, out, num_workers, progress_seconds)
    by_split = {"train": {}, "validation": {}}
    for r in results:
        by_split[r.name.split("-")[0]][r.name] = r.count
    total = len(train) + len(val)
    skipped = [s for r in results for s in r.skipped]
    report = {
        "images": total,
        "written": {split: sum(files.values()) for split, files in by_split.items()},
        "reencoded": [p for r in results for p in r.reencoded],
        "skipped": skipped,
        "ignored": [list(i) for i in ignored],
        "empty_classes": list(empty_classes),
        "resumed_shards": [r.name for r in results if r.resumed],
    }
    _write_json(os.path.join(out, REPORT), report)
    if len(skipped) > max_skipped_fraction * total:
        raise ConvertError(
            f"{len(skipped)} of {total} images could not be read, more than "
            f"--max_skipped_fraction={max_skipped_fraction}: see {os.path.join(out, REPORT)}, "
            "then fix or remove them or raise the fraction"
        )
    with open(os.path.join(out, "labels.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    counts = {
        "num_classes": len(classes),
        "train": report["written"]["train"],
        "validation": report["written"]["validation"],
        # Per file: a reader never counts, a resumed run finds its place in an epoch.
        "train_files": by_split["train"],
        "validation_files": by_split["validation"],
    }
    _write_json(os.path.join(out, "counts.json"), counts)
    return counts


def convert(src: str, out: str, val_fraction: float = 0.1, shards: int = 8, seed: int = 0, **kw):
    """One class-folder tree, a stratified ``val_fraction`` of each class held out."""
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val_fraction={val_fraction} must be in [0, 1)")
    if shards < 1:
        raise ConvertError(f"--shards={shards} must be at least 1")
    found = layouts.tree(src, "--src")
    train, val = split_items(found.images, val_fraction, seed)
    kw.setdefault("val_shards", max(1, shards // 4))
    return write(out, found.classes, train, val, shards_count=shards, **_found(found), **kw)


def _found(*found) -> dict:
    return {
        "ignored": sorted(i for f in found for i in f.ignored),
        "empty_classes": sorted(e for f in found for e in f.empty_classes),
    }


def _write_split(out: str, train, val, shards: int, seed: int, **kw) -> dict:
    """A layout that ships its own split: training images shuffled by ``seed`` (a shard
    holds every class), validation in its files' order."""
    images = list(train.images)
    random.Random(seed).shuffle(images)
    return write(
        out, train.classes, images, val.images, shards_count=shards, **_found(train, val), **kw
    )


def convert_trees(train_dir: str, val_dir: str, out: str, shards: int = 8, seed: int = 0, **kw):
    """A ``train/`` and a ``val/`` class-folder tree; classes from ``train_dir``."""
    train = layouts.tree(train_dir, "--train_dir")
    val = layouts.tree(val_dir, "--val_dir", train.classes)
    kw.setdefault("val_shards", max(1, shards // 4))
    return _write_split(out, train, val, shards, seed, **kw)


def convert_imagenet(
    imagenet_dir: str,
    out: str,
    shards: int = 1024,
    val_shards: int = 128,
    seed: int = 0,
    val_labels=None,
    val_ground_truth=None,
    synset_order=None,
    class_names=None,
    **kw,
):
    """Raw ILSVRC2012 into the usual 1,024 training and 128 validation shards."""
    train, val = layouts.imagenet(imagenet_dir, val_labels, val_ground_truth, synset_order)
    default_names = os.path.join(imagenet_dir, "LOC_synset_mapping.txt")
    if class_names is None and os.path.exists(default_names):
        class_names = default_names
    names = layouts.class_names(class_names)
    return _write_split(out, train, val, shards, seed, val_shards=val_shards, names=names, **kw)


def run(fv) -> dict:
    """The conversion the parsed flags ask for."""
    chosen = [f for f in ("src", "train_dir", "imagenet_dir") if fv[f].value]
    if len(chosen) != 1 or not fv.out:
        raise ConvertError(
            "give --out and one of --src, --train_dir with --val_dir, or --imagenet_dir"
        )
    if (fv.train_dir is None) != (fv.val_dir is None):
        raise ConvertError("--train_dir and --val_dir go together")
    kw = {
        "one_based_labels": fv.one_based_labels,
        "num_workers": fv.num_workers,
        "max_skipped_fraction": fv.max_skipped_fraction,
        "progress_seconds": fv.progress_seconds,
        "seed": fv.seed,
    }
    if fv.val_shards is not None:
        kw["val_shards"] = fv.val_shards
    if fv.src:
        return convert(fv.src, fv.out, fv.val_fraction, fv.shards or 8, **kw)
    if fv.train_dir:
        return convert_trees(fv.train_dir, fv.val_dir, fv.out, fv.shards or 8, **kw)
    return convert_imagenet(
        fv.imagenet_dir,
        fv.out,
        fv.shards or 1024,
        val_labels=fv.val_labels,
        val_ground_truth=fv.val_ground_truth,
        synset_order=fv.synset_order,
        class_names=fv.class_names,
        **kw,
    )


def summary(counts: dict, out: str) -> str:
    with open(os.path.join(out, REPORT)) as f:
        report = json.load(f)
    return (
        f"{counts['num_classes']} classes: {counts['train']} train and "
        f"{counts['validation']} validation images written to {out} "
        f"({len(report['reencoded'])} re-encoded as RGB JPEG, {len(report['skipped'])} "
        f"skipped, {len(report['ignored'])} ignored files; see {REPORT})"
    )


def main(argv):
    from absl import flags

    del argv
    try:
        counts = run(flags.FLAGS)
    except (ConvertError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary(counts, flags.FLAGS.out))


if __name__ == "__main__":
    from absl import app

    from input_pipeline.conversion import options

    options.define()
    app.run(main)
