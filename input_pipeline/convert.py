"""Converts a folder of class sub-folders of JPEG/PNG images into ImageNet-layout TFRecords.

    python -m input_pipeline.convert --src DIR --out DIR [--val_fraction F] [--shards N]

Class names are the sorted sub-folder names; labels are 0-based indices into
``labels.txt``. A stratified fraction of each class goes to ``validation-*``.
Image bytes are stored unchanged (the reader decodes JPEG and PNG). Writes
``counts.json`` for ``--dataset=folder`` and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ConvertError(ValueError):
    pass


def find_images(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) pairs; every file is checked to be an image."""
    if not os.path.isdir(src):
        raise ConvertError(f"--src={src} is not a directory")
    classes = sorted(
        d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)) and not d.startswith(".")
    )
    if not classes:
        raise ConvertError(f"--src={src} has no class sub-folders (expected SRC/CLASS/image.jpg)")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(src, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                items.append((os.path.join(folder, file), label))
    if not items:
        raise ConvertError(f"--src={src} has no .jpg, .jpeg or .png files in its class folders")
    return classes, items


def _read_checked(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise ConvertError(f"{path} is not a readable JPEG or PNG image") from None
    return data


def _example(data: bytes, label: int) -> bytes:
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


def write_shards(items, out: str, prefix: str, shards: int) -> dict[str, int]:
    """Writes the items round-robin into shards; returns records per shard file name."""
    shards = max(1, min(shards, len(items)))
    names = [f"{prefix}-{i:05d}-of-{shards:05d}" for i in range(shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(out, name)) for name in names]
    counts = dict.fromkeys(names, 0)
    for index, (path, label) in enumerate(items):
        writers[index % shards].write(_example(_read_checked(path), label))
        counts[names[index % shards]] += 1
    for writer in writers:
        writer.close()
    return counts


def convert(src: str, out: str, val_fraction: float = 0.1, shards: int = 8, seed: int = 0):
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val_fraction={val_fraction} must be in [0, 1)")
    if shards < 1:
        raise ConvertError(f"--shards={shards} must be at least 1")
    classes, items = find_images(src)
    train, val = split_items(items, val_fraction, seed)
    if not val:
        raise ConvertError("the validation split is empty: raise --val_fraction or add images")
    os.makedirs(out, exist_ok=True)
    train_files = write_shards(train, out, "train", shards)
    validation_files = write_shards(val, out, "validation", max(1, shards // 4))
    counts = {
        "num_classes": len(classes),
        "train": sum(train_files.values()),
        "validation": sum(validation_files.values()),
        # Per file: a resumed run finds its place in an epoch without reading them.
        "train_files": train_files,
    }
    with open(os.path.join(out, "labels.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    with open(os.path.join(out, "counts.json"), "w") as f:
        json.dump(counts, f, indent=2)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder of class sub-folders of images")
    parser.add_argument("--out", required=True, help="output folder for the TFRecords")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = convert(args.src, args.out, args.val_fraction, args.shards, args.seed)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{counts['num_classes']} classes: {counts['train']} train and "
        f"{counts['validation']} validation images written to {args.out}"
    )


if __name__ == "__main__":
    main()
