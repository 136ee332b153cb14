"""Small image-folder data sets, converted as a user would (``input_pipeline.convert``)."""

import os

import numpy as np
import tensorflow as tf

from input_pipeline import convert


def write_folder_dataset(root: str, seed: int, size: int, shards: int) -> str:
    """10 random PNGs of ``size`` px in each of 3 classes under ``root/images``, converted
    into ``root/records`` (a stratified fifth held out); returns the records' folder."""
    rng = np.random.default_rng(seed)
    src = os.path.join(root, "images")
    for name in ("ant", "bee", "cow"):
        os.makedirs(os.path.join(src, name))
        for i in range(10):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            with open(os.path.join(src, name, f"{i}.png"), "wb") as f:
                f.write(tf.io.encode_png(pixels).numpy())
    out = os.path.join(root, "records")
    convert.convert(src, out, val_fraction=0.2, shards=shards, seed=1)
    return out
