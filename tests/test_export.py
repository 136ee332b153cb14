"""Serving export: a SavedModel with JPEG and pixel signatures, and a plain .keras file.

The SavedModel is run two ways: by TensorFlow 2's loader
(``serving_check_program.py``) and by ``saved_model_cli run``, whose session
loader is the one TensorFlow Serving uses; a SavedModel can load in the first
and not in the second.
"""

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


class SavedModelCli:
    """``saved_model_cli run`` of one signature on ``images`` from an .npy file.

    Started at once (the runs go alongside the other children of the fixture);
    ``outputs()`` waits and returns the .npy files it wrote, by output key.
    """

    def __init__(self, saved_model, signature, images, workdir):
        self.signature = signature
        inputs = os.path.join(workdir, f"{signature}_images.npy")
        np.save(inputs, images)
        self.outdir = os.path.join(workdir, f"{signature}_outputs")
        self.log = os.path.join(workdir, f"{signature}.log")
        script = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        if os.path.exists(script):
            command = [script]
        else:
            command = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    *command,
                    "run",
                    f"--dir={saved_model}",
                    "--tag_set=serve",
                    f"--signature_def={signature}",
                    f"--inputs=images={inputs}",
                    f"--outdir={self.outdir}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def outputs(self) -> dict:
        try:
            self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if self.proc.returncode != 0:
            with open(self.log) as f:
                raise AssertionError(
                    f"saved_model_cli run {self.signature} failed:\n{f.read()[-3000:]}"
                )
        return {
            name[: -len(".npy")]: np.load(os.path.join(self.outdir, name), allow_pickle=True)
            for name in os.listdir(self.outdir)
        }


def center_window(height, width):
    """(top, left, side) of the evaluation centre crop: side int(0.875 * shorter side)."""
    side = max(int(0.875 * min(height, width)), 1)
    return (height - side) // 2, (width - side) // 2, side


def center_crop(image):
    top, left, side = center_window(*image.shape[:2])
    return image[top : top + side, left : left + side]


def center_crop_jpeg(data):
    """The centre crop decoded by the fused JPEG op, as evaluation decodes it: at the
    crop's edges it differs from decoding the whole image and cropping (chroma
    upsampling sees other neighbours), here by up to 40 levels."""
    height, width = tf.image.extract_jpeg_shape(data).numpy()[:2]
    top, left, side = center_window(int(height), int(width))
    return tf.image.decode_and_crop_jpeg(data, [top, left, side, side], channels=3).numpy()


def reference_probabilities(model, crops):
    """The Keras model on centre crops resized as evaluation does (bilinear, clipped
    to [0, 255]); softmax in float64."""
    batch = [
        np.clip(tf.image.resize(crop.astype(np.float32), [IMAGE_SIZE, IMAGE_SIZE]).numpy(), 0, 255)
        for crop in crops
    ]
    logits = np.asarray(model(np.stack(batch), training=False), np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


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
        jpegs = validation_jpegs(records)
        cls.images_dir = os.path.join(cls.root, "serve")
        os.makedirs(cls.images_dir)
        for i, data in enumerate(jpegs):
            with open(os.path.join(cls.images_dir, f"{i}.jpg"), "wb") as f:
                f.write(data)
        cls.saved_model = os.path.join(cls.model_dir, "export", "saved_model")
        cls.keras_model = keras.models.load_model(
            os.path.join(cls.model_dir, "export", "model.keras")
        )
        pixels = [tf.io.decode_jpeg(data, channels=3).numpy() for data in jpegs]
        # serving_default: the validation JPEGs (sizes differ) and one PNG.
        encoded = jpegs + [tf.io.encode_png(pixels[0]).numpy()]
        cls.encoded_crops = [center_crop_jpeg(data) for data in jpegs] + [center_crop(pixels[0])]
        # serve_pixels takes one size: the validation images cut to the smallest.
        height = min(p.shape[0] for p in pixels)
        width = min(p.shape[1] for p in pixels)
        cls.pixel_batch = np.stack([p[:height, :width] for p in pixels])
        cls.cli_encoded = SavedModelCli(
            cls.saved_model, "serving_default", np.array(encoded, dtype=object), cls.root
        )
        cls.cli_pixels = SavedModelCli(cls.saved_model, "serve_pixels", cls.pixel_batch, cls.root)
        cls.served = run_for_result(
            "tests/serving_check_program.py", cls.saved_model, cls.images_dir
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

    def assert_matches_keras_model(self, served, crops):
        expected = reference_probabilities(self.keras_model, crops)
        top_k = np.argsort(-expected, axis=1, kind="stable")[:, :3]
        self.assertEqual(
            sorted(served), ["probabilities", "top_k_ids", "top_k_names", "top_k_scores"]
        )
        self.assertAllClose(served["probabilities"], expected, atol=1e-5, rtol=0)
        self.assertAllEqual(served["top_k_ids"], top_k)
        self.assertAllClose(
            served["top_k_scores"], np.take_along_axis(expected, top_k, 1), atol=1e-5, rtol=0
        )
        self.assertEqual(
            [[name.decode() for name in row] for row in served["top_k_names"]],
            [[CLASSES[i] for i in row] for row in top_k],
        )

    def test_saved_model_cli_runs_encoded_images(self):
        """TensorFlow Serving's loader: JPEG and PNG bytes, centre crop and resize."""
        self.assert_matches_keras_model(self.cli_encoded.outputs(), self.encoded_crops)

    def test_saved_model_cli_runs_pixels(self):
        """TensorFlow Serving's loader: a uint8 [N, H, W, 3] batch, centre crop and resize."""
        crops = [center_crop(image) for image in self.pixel_batch]
        self.assert_matches_keras_model(self.cli_pixels.outputs(), crops)

    def test_labels_file_and_plain_keras_model(self):
        export_dir = os.path.join(self.model_dir, "export")
        with open(os.path.join(export_dir, "labels.txt")) as f:
            self.assertEqual(f.read().split(), CLASSES)
        self.assertEqual(self.keras_model.output_shape, (None, 3))


if __name__ == "__main__":
    tf.test.main()
