"""The absl flags of ``python -m input_pipeline.convert`` (defined only when it runs:
``main.py``'s flags live in the same process in tests)."""

from __future__ import annotations

import os

from absl import flags as absl_flags


def define(fv=absl_flags.FLAGS):
    d = absl_flags
    d.DEFINE_string("out", None, "Output folder for the TFRecords.", flag_values=fv)
    d.DEFINE_string(
        "src",
        None,
        "One tree of class folders, split into train and validation by --val_fraction.",
        flag_values=fv,
    )
    d.DEFINE_float(
        "val_fraction", 0.1, "With --src: the fraction of each class held out.", flag_values=fv
    )
    d.DEFINE_string(
        "train_dir", None, "Training tree of class folders (with --val_dir).", flag_values=fv
    )
    d.DEFINE_string(
        "val_dir",
        None,
        "Validation tree of class folders; its classes must be folders of --train_dir.",
        flag_values=fv,
    )
    d.DEFINE_string(
        "imagenet_dir",
        None,
        "Raw ILSVRC2012: train/ synset folders and val/ (synset folders, or flat with "
        "--val_labels or --val_ground_truth).",
        flag_values=fv,
    )
    d.DEFINE_string(
        "val_labels",
        None,
        "LOC_val_solution.csv for a flat val/ (default: IMAGENET_DIR/LOC_val_solution.csv).",
        flag_values=fv,
    )
    d.DEFINE_string(
        "val_ground_truth",
        None,
        "The devkit's ILSVRC2012_validation_ground_truth.txt for a flat val/.",
        flag_values=fv,
    )
    d.DEFINE_string(
        "synset_order",
        None,
        "With --val_ground_truth: the devkit's meta.mat, or synsets one a line in "
        "ILSVRC2012_ID order.",
        flag_values=fv,
    )
    d.DEFINE_string(
        "class_names",
        None,
        "Synset names (LOC_synset_mapping.txt: 'n01440764 tench, ...') stored as "
        "image/class/text (default: IMAGENET_DIR/LOC_synset_mapping.txt if present).",
        flag_values=fv,
    )
    d.DEFINE_boolean(
        "one_based_labels",
        False,
        "Store labels 1..N (read with --one_based_labels) instead of 0..N-1.",
        flag_values=fv,
    )
    d.DEFINE_integer(
        "shards", None, "Training shards (default: 8; 1024 with --imagenet_dir).", flag_values=fv
    )
    d.DEFINE_integer(
        "val_shards",
        None,
        "Validation shards (default: a quarter of --shards; 128 with --imagenet_dir).",
        flag_values=fv,
    )
    d.DEFINE_integer("seed", 0, "Seed of the split and of the training order.", flag_values=fv)
    d.DEFINE_integer(
        "num_workers",
        os.cpu_count() or 1,
        "Processes writing shards (default: the machine's cores). Shards are the same "
        "bytes for any number.",
        flag_values=fv,
    )
    d.DEFINE_float(
        "max_skipped_fraction",
        0.001,
        "Fail when more than this fraction of the images cannot be read.",
        flag_values=fv,
    )
    d.DEFINE_float("progress_seconds", 10.0, "Seconds between progress lines.", flag_values=fv)
