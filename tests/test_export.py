"""Serving export: a SavedModel with JPEG and pixel signatures, and a plain .keras file."""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tests.child_process import ROOT, run_for_result, run_main

CLASSES = ["cat", "dog", "emu"]
IMAGE_SIZE = 72  # above the small-image limit: centre crop, then resize


def make_folder_dataset(root):
    """JPEG class folders, converted to the folder source's TFRecords."""
    rng = np.random.default_rng(5)
    src = os.path.join(root, "images")
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(src, name))
        for i in range(8):
            pixels = rng.integers(0, 256, (80 + 4 * i, 96 + 3 * label, 3), dtype=np.uint8)
            pixels[:, :, label] = np.minimum(pixels[:, :, label].astype(int) + 90, 255)
            with open(os.path.join(src, name, f"{i}.jpg"), "wb") as f:
                f.write(tf.io.encode_jpeg(pixels).numpy())
    out = os.path.join(root, "records")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "input_pipeline.convert",
            f"--src={src}",
            f"--out={out}",
            "--val_fraction=0.25",
            "--shards=1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def validation_jpegs(records_dir):
    """The validation images' encoded bytes, in the order the eval pipeline reads them."""
    files = sorted(tf.io.gfile.glob(os.path.join(records_dir, "validation-*")))
    feature = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
    return [
        tf.io.parse_single_example(record, feature)["image/encoded"].numpy()
        for record in tf.data.TFRecordDataset(files)
    ]


class ExportTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        records = make_folder_dataset(cls.root)
        cls.model_dir = os.path.join(cls.root, "run")
        flags = (
            "--dataset=folder",
            f"--data_dir={records}",
            # Full width: TensorFlow 2.21's oneDNN kernels crash on narrower
            # ResNet-20s at this size on some CPUs (BUILD.md, known limits).
            "--model=resnet20",
            f"--image_size={IMAGE_SIZE}",
            "--batch_size=8",
            "--eval_batch_size=8",
            "--train_steps=4",
            "--steps_per_loop=4",
            "--method=vanilla",
            f"--model_dir={cls.model_dir}",
        )
        run_main(*flags, "--mode=train")
        run_main(*flags, "--mode=eval", "--eval_predictions")
        with open(os.path.join(cls.model_dir, "predictions.json")) as f:
            cls.predictions = json.load(f)
        cls.images_dir = os.path.join(cls.root, "serve")
        os.makedirs(cls.images_dir)
        for i, data in enumerate(validation_jpegs(records)):
            with open(os.path.join(cls.images_dir, f"{i}.jpg"), "wb") as f:
                f.write(data)
        cls.served = run_for_result(
            "tests/serving_check_program.py",
            os.path.join(cls.model_dir, "export", "saved_model"),
            cls.images_dir,
        )

    def test_signatures_and_outputs(self):
        self.assertEqual(self.served["signatures"], ["serve_pixels", "serving_default"])
        self.assertEqual(
            self.served["outputs"], ["probabilities", "top_k_ids", "top_k_names", "top_k_scores"]
        )
        self.assertAllClose(self.served["probability_sums"], [1.0] * 6, atol=1e-5)

    def test_both_signatures_agree_with_eval_predictions(self):
        self.assertLen(self.predictions["top_k_ids"], 6)
        self.assertEqual(self.served["bytes_top_k"], self.predictions["top_k_ids"])
        self.assertEqual(self.served["pixels_top_k"], self.predictions["top_k_ids"])
        self.assertEqual(
            self.served["names"],
            [[CLASSES[i] for i in row] for row in self.predictions["top_k_ids"]],
        )

    def test_labels_file_and_plain_keras_model(self):
        export_dir = os.path.join(self.model_dir, "export")
        with open(os.path.join(export_dir, "labels.txt")) as f:
            self.assertEqual(f.read().split(), CLASSES)
        model = keras.models.load_model(os.path.join(export_dir, "model.keras"))
        self.assertEqual(model.output_shape, (None, 3))


if __name__ == "__main__":
    tf.test.main()
