"""Which images a conversion reads, with their labels: the layouts data ships in.

- a class-folder tree (``--src``; ``--train_dir`` and ``--val_dir``): classes
  are the sorted folder names; images may sit in folders nested in a class;
- ILSVRC2012 (``--imagenet_dir``): ``train/`` synset folders; ``val/`` as
  synset folders, or flat with ``LOC_val_solution.csv`` or the devkit's
  ``ILSVRC2012_validation_ground_truth.txt`` and its synset order.

Extensions match in any case. Hidden entries and files without an image
extension are not read; each is listed in ``Found.ignored`` with the reason.
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class LayoutError(ValueError):
    """A one-line message naming what is wrong with the input and how to fix it."""


class Image(NamedTuple):
    path: str
    label: int
    filename: str  # relative to its tree, stored as image/filename
    synset: str  # the class folder's name


class Found(NamedTuple):
    classes: list[str]
    images: list[Image]
    ignored: list[tuple[str, str]]  # (path, reason)
    empty_classes: list[str]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: str, ignored: list) -> list[str]:
    """Relative paths of the image files under ``folder``, sorted; the rest ignored."""
    found = []
    for root, dirs, files in os.walk(folder):
        for d in [d for d in dirs if d.startswith(".")]:
            ignored.append((os.path.join(root, d), "hidden folder"))
            dirs.remove(d)
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("."):
                ignored.append((path, "hidden file"))
            elif not _is_image(name):
                ignored.append((path, "not an image extension (.jpg, .jpeg, .png)"))
            else:
                found.append(os.path.relpath(path, folder))
    return sorted(found)


def class_folders(root: str, flag: str, ignored: list) -> list[str]:
    if not os.path.isdir(root):
        raise LayoutError(f"{flag}={root} is not a directory")
    classes = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith("."):
            ignored.append((path, "hidden file" if os.path.isfile(path) else "hidden folder"))
        elif os.path.isdir(path):
            classes.append(name)
        else:
            ignored.append((path, "not in a class folder"))
    if not classes:
        raise LayoutError(f"{flag}={root} has no class sub-folders (expected ROOT/CLASS/image.jpg)")
    return classes


def tree(root: str, flag: str, classes: list[str] | None = None) -> Found:
    """Images of a class-folder tree; with ``classes``, its folders must be among them."""
    ignored: list = []
    names = class_folders(root, flag, ignored)
    if classes is None:
        classes = names
    for name in names:
        if name not in classes:
            raise LayoutError(
                f"class {name!r} of {flag}={root} is not a class of the training data: "
                "add its folder to the training tree or remove it"
            )
    images, empty = [], []
    for name in names:
        files = _walk(os.path.join(root, name), ignored)
        if not files:
            empty.append(os.path.join(root, name))
        label = classes.index(name)
        images += [
            Image(os.path.join(root, name, f), label, os.path.join(name, f), name) for f in files
        ]
    if not images:
        raise LayoutError(f"{flag}={root} has no .jpg, .jpeg or .png files in its class folders")
    return Found(classes, images, sorted(ignored), empty)


# ------------------------------------------------------------------ ILSVRC2012


def _solution_csv(path: str) -> dict[str, str]:
    """``LOC_val_solution.csv``: image id → synset (the first word of PredictionString)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        raise LayoutError(f"{path} does not start with the header ImageId,PredictionString")
    return {row[0]: row[1].split()[0] for row in rows[1:] if row}


def _synset_order(path: str) -> list[str]:
    """Synsets in ILSVRC2012_ID order: a text file, one synset a line (first word), or
    the devkit's ``meta.mat``."""
    if path.endswith(".mat"):
        try:
            from scipy import io as scipy_io  # only for meta.mat
        except ImportError:
            raise LayoutError(
                f"--synset_order={path}: reading meta.mat needs scipy (pip install scipy), or "
                "give the synsets one a line in ILSVRC2012_ID order"
            ) from None

        synsets = scipy_io.loadmat(path, squeeze_me=True)["synsets"]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        return [by_id[i] for i in range(1, 1001)]
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _ground_truth(path: str, order_path: str | None) -> dict[str, str]:
    """The devkit's ground truth (1-based ILSVRC2012_IDs in image order) → image id → synset."""
    if order_path is None:
        raise LayoutError(
            f"--val_ground_truth={path} needs --synset_order (the devkit's meta.mat, or its "
            "synsets one a line in ILSVRC2012_ID order)"
        )
    order = _synset_order(order_path)
    with open(path) as f:
        ids = [int(line) for line in f if line.strip()]
    labels = {}
    for index, ilsvrc_id in enumerate(ids, start=1):
        if not 1 <= ilsvrc_id <= len(order):
            raise LayoutError(f"{path} line {index}: ID {ilsvrc_id} outside 1..{len(order)}")
        labels[f"ILSVRC2012_val_{index:08d}"] = order[ilsvrc_id - 1]
    return labels


def class_names(path: str | None) -> dict[str, str]:
    """``LOC_synset_mapping.txt``: synset → human-readable name."""
    if path is None:
        return {}
    with open(path) as f:
        pairs = [line.rstrip("\n").split(" ", 1) for line in f if line.strip()]
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def flat_val(val: str, labels: dict[str, str], classes: list[str], source: str) -> Found:
    """A flat ``val/``: every image's synset from the ground truth ``labels``."""
    ignored: list = []
    images = []
    for rel in _walk(val, ignored):
        image_id = os.path.splitext(os.path.basename(rel))[0]
        if image_id not in labels:
            raise LayoutError(f"{os.path.join(val, rel)} has no label in {source}")
        synset = labels[image_id]
        if synset not in classes:
            raise LayoutError(
                f"{source} gives {image_id} the synset {synset}, which is not a folder of train/"
            )
        images.append(Image(os.path.join(val, rel), classes.index(synset), rel, synset))
    if not images:
        raise LayoutError(f"{val} has no .jpg, .jpeg or .png files")
    return Found(classes, images, sorted(ignored), [])


def imagenet(root, val_labels=None, val_ground_truth=None, synset_order=None):
    """(train, validation) of the raw ILSVRC2012 layout under ``root``."""
    train = tree(os.path.join(root, "train"), "--imagenet_dir (train/)")
    val = os.path.join(root, "val")
    if not os.path.isdir(val):
        raise LayoutError(f"--imagenet_dir={root} has no val/ folder")
    if any(os.path.isdir(os.path.join(val, d)) for d in os.listdir(val) if not d.startswith(".")):
        return train, tree(val, "--imagenet_dir (val/)", train.classes)
    if val_labels is None and val_ground_truth is None:
        default = os.path.join(root, "LOC_val_solution.csv")
        if not os.path.exists(default):
            raise LayoutError(
                f"{val} is flat: give its labels with --val_labels=LOC_val_solution.csv or "
                "--val_ground_truth=ILSVRC2012_validation_ground_truth.txt --synset_order=FILE"
            )
        val_labels = default
    if val_labels is not None:
        labels, source = _solution_csv(val_labels), val_labels
    else:
        labels, source = _ground_truth(val_ground_truth, synset_order), val_ground_truth
    return train, flat_val(val, labels, train.classes, source)
