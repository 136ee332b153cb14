"""Conversion throughput on generated ImageNet-like JPEGs (500×375, smooth content,
about ImageNet's bytes per image), with 1 and with N workers.

    python -m input_pipeline.conversion.benchmark --images 2000 --workers 1,2

Prints images/s per worker count (the whole conversion: the workers' start,
reading, checking, writing) and the time those rates project for ImageNet's
1.33 M images. The images are generated once in a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from input_pipeline import convert

IMAGENET_IMAGES = 1_281_167 + 50_000


def generate(root: str, count: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        phase = rng.uniform(0, 6.3, 3)
        freq = rng.uniform(0.01, 0.08, 3)
        channels = [np.sin(freq[c] * x + phase[c]) * np.cos(freq[c] * y) for c in range(3)]
        noise = rng.normal(0, 12, (375, 500, 3))
        image = np.clip(127 + 100 * np.stack(channels, -1) + noise, 0, 255).astype(np.uint8)
        with open(os.path.join(folder, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(tf.io.encode_jpeg(image, quality=90).numpy())


def main(argv):
    from absl import flags

    del argv
    args = flags.FLAGS
    with tempfile.TemporaryDirectory() as root:
        src = os.path.join(root, "images")
        generate(src, args.images)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
        print(f"{args.images} JPEGs of 500x375, {size / args.images / 1024:.0f} KiB each")
        for workers in sorted({int(w) for w in args.workers.split(",")}):
            out = os.path.join(root, f"out{workers}")
            start = time.perf_counter()
            convert.convert(src, out, 0.1, shards=16, num_workers=workers, progress_seconds=1e9)
            rate = args.images / (time.perf_counter() - start)
            hours = IMAGENET_IMAGES / rate / 3600
            print(
                f"{workers} workers: {rate:.0f} images/s; ImageNet's 1.33 M images "
                f"would take {hours:.1f} h at this rate"
            )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("images", 2000, "Images to generate and convert.")
    flags.DEFINE_string("workers", f"1,{os.cpu_count() or 1}", "Worker counts to time.")
    app.run(main)
