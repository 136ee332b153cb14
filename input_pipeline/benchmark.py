"""Input pipeline throughput: training images per second for each ``--augment`` setting.

    python -m input_pipeline.benchmark --augment none,autoaugment,randaugment
    python -m input_pipeline.benchmark --dataset imagenet --data_dir /data/imagenet

Without ``--data_dir`` it writes ImageNet-like JPEGs (about 500×375, smooth
content plus noise, quality 90) to a temporary directory in the ``imagenet``
layout and reads those. Each setting runs the real training pipeline (read,
shuffle, fused decode-and-crop, resize, augmentation, flip, batch) on this
host's CPUs; the rate is measured after warm-up batches, which also fill the
shuffle buffer, and is printed per CPU core because input hosts scale by cores.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags as absl_flags

FLAGS = absl_flags.FLAGS
absl_flags.DEFINE_string("dataset", "imagenet", "imagenet, folder or tfds:NAME.")
absl_flags.DEFINE_string("data_dir", None, "Data to read; unset: generate ImageNet-like JPEGs.")
absl_flags.DEFINE_list("augment", ["none", "autoaugment", "randaugment"], "Settings to time.")
absl_flags.DEFINE_enum("autoaugment_policy", "v0", ["v0", "imagenet"], "AutoAugment policy.")
absl_flags.DEFINE_integer("randaugment_layers", 2, "RandAugment ops per image.")
absl_flags.DEFINE_float("randaugment_magnitude", 10.0, "RandAugment magnitude.")
absl_flags.DEFINE_integer("image_size", 224, "Output image size.")
absl_flags.DEFINE_integer("batch_size", 64, "Images per batch.")
absl_flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing.")
absl_flags.DEFINE_integer("batches", 20, "Batches timed per setting.")
absl_flags.DEFINE_integer("generated_images", 128, "Images to generate without --data_dir.")
absl_flags.DEFINE_integer("num_classes", None, "Classes (default: the dataset's).")
absl_flags.DEFINE_bool(
    "check_decode",
    True,
    "Time with the per-image decode check that names corrupt records (as training runs); "
    "--nocheck_decode shows its cost.",
)

GENERATED_SIZE = (375, 500)  # typical ImageNet height × width


def generate_imagenet_like(directory: str, count: int, seed: int = 0) -> int:
    """Writes ``count`` JPEGs as ``train-*``/``validation-*`` shards; returns the count."""
    import tensorflow as tf

    from input_pipeline import convert

    rng = np.random.default_rng(seed)
    height, width = GENERATED_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    shards = 4
    for split, n in (("train", count), ("validation", max(1, count // 8))):
        writers = [
            tf.io.TFRecordWriter(os.path.join(directory, f"{split}-{s:05d}-of-{shards:05d}"))
            for s in range(shards)
        ]
        for i in range(n):
            phase = rng.uniform(0, 6, 3)
            waves = x[..., None] / rng.uniform(20, 80) + y[..., None] / 50 + phase
            image = 128 + 90 * np.sin(waves)
            image += rng.normal(0, 12, image.shape)
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            data = tf.io.encode_jpeg(pixels, quality=90).numpy()
            writers[i % shards].write(convert._example(data, i % 10))
        for writer in writers:
            writer.close()
    return count


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def images_per_second(source, batch_size: int, warmup: int, batches: int) -> float:
    from input_pipeline.base import TRAIN

    iterator = iter(source.dataset(TRAIN, batch_size))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    images.numpy()
    return batches * batch_size / (time.perf_counter() - start)


def run(values) -> list[dict]:
    """Times each augmentation setting; returns one row per setting."""
    from input_pipeline import registry
    from input_pipeline.base import PipelineOptions

    data_dir, dataset, extra = values.data_dir, values.dataset, {}
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="input_benchmark_")
        count = generate_imagenet_like(data_dir, values.generated_images)
        dataset = "imagenet"
        extra = {"num_train_examples": count}
    rows = []
    for augment in values.augment:
        options = PipelineOptions(
            augment=augment,
            autoaugment_policy=values.autoaugment_policy,
            randaugment_layers=values.randaugment_layers,
            randaugment_magnitude=values.randaugment_magnitude,
            check_decode=values.check_decode,
        )
        source = registry.get_source(
            dataset,
            image_size=values.image_size,
            data_dir=data_dir,
            num_classes=values.num_classes,
            options=options,
            **extra,
        )
        rate = images_per_second(source, values.batch_size, values.warmup_batches, values.batches)
        rows.append({"augment": augment, "images_per_s": rate, "per_core": rate / cpu_cores()})
    return rows


def format_table(rows: list[dict], values) -> str:
    label = {"autoaugment": f"autoaugment ({values.autoaugment_policy})"}
    label["randaugment"] = (
        f"randaugment (N={values.randaugment_layers}, M={values.randaugment_magnitude:g})"
    )
    base = rows[0]["images_per_s"]
    lines = [
        f"input pipeline, {values.image_size}px, batch {values.batch_size}, "
        f"{cpu_cores()} CPU cores" + ("" if values.check_decode else ", no decode check"),
        f"| --augment | images/s | images/s per core | vs {rows[0]['augment']} |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {label.get(row['augment'], row['augment'])} | {row['images_per_s']:.1f} "
            f"| {row['per_core']:.1f} | {row['images_per_s'] / base:.2f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    from input_pipeline.base import DataError

    for setting in FLAGS.augment:
        if setting not in ("none", "autoaugment", "randaugment"):
            sys.exit(f"error: --augment={setting}: choose from none, autoaugment, randaugment")
    try:
        rows = run(FLAGS)
    except DataError as error:
        sys.exit(f"error: {error}")
    print(format_table(rows, FLAGS), flush=True)


if __name__ == "__main__":
    app.run(main)
