"""ImageNet-layout TFRecords, preprocessing and the folder converter, on generated images."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from input_pipeline import convert, preprocessing
from input_pipeline.base import EVAL, TRAIN, DataError, PipelineOptions, data_error_from
from input_pipeline.imagenet import FolderSource, ImageNetSource
from tests.child_process import TINY_RESNET, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(rng, height, width):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(pixels).numpy()


def _png(rng, height, width):
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def write_imagenet_layout(
    directory, files_per_split=(4, 2), per_file=5, one_based=True, classes=10
):
    """Shards with labels 1..classes (or 0..classes-1), record k of a split labelled
    k mod classes; returns {split: [(file, labels...)]}."""
    rng = np.random.default_rng(0)
    written = {}
    for prefix, num_files in zip(("train", "validation"), files_per_split):
        written[prefix] = []
        for f in range(num_files):
            path = os.path.join(directory, f"{prefix}-{f:05d}-of-{num_files:05d}")
            labels = [(f * per_file + i) % classes for i in range(per_file)]
            with tf.io.TFRecordWriter(path) as writer:
                for label in labels:
                    writer.write(convert._example(_jpeg(rng, 40, 56), label + int(one_based)))
            written[prefix].append((path, labels))
    return written


class ImageNetSourceTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.get_temp_dir()
        self.written = write_imagenet_layout(self.dir)

    def _source(self, num_classes=10, **kwargs):
        return ImageNetSource(self.dir, image_size=32, num_classes=num_classes, **kwargs)

    def test_one_based_labels_read_back_zero_based(self):
        source = self._source(one_based_labels=True)
        labels = np.concatenate([y.numpy() for _, y in source.dataset(EVAL, 4)])
        expected = [label for _, labels in self.written["validation"] for label in labels]
        self.assertAllEqual(labels, expected)

    def test_label_out_of_range_names_file_and_record(self):
        source = self._source(one_based_labels=False, num_classes=2)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"validation-00000.*record"):
            for _ in source.dataset(EVAL, 4):
                pass

    def test_per_host_sharding_covers_every_file_once(self):
        source = self._source(one_based_labels=True)
        seen = collections.Counter()
        for host in range(2):
            context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=host)
            records = source._records(source.train_files, context)
            files = {f.numpy().decode() for f, _, _ in records}
            seen.update(files)
        self.assertEqual(sorted(seen), sorted(p for p, _ in self.written["train"]))
        self.assertEqual(set(seen.values()), {1})

    def test_train_batches_and_eval_determinism(self):
        source = self._source(one_based_labels=True, options=PipelineOptions(seed=1))
        images, labels = next(iter(source.dataset(TRAIN, 8)))
        self.assertEqual(images.shape, (8, 32, 32, 3))
        self.assertTrue(np.all((labels.numpy() >= 0) & (labels.numpy() < 10)))
        self.assertBetween(float(tf.reduce_min(images)), 0.0, 255.0)
        self.assertLessEqual(float(tf.reduce_max(images)), 255.0)
        first = [x.numpy() for x, _ in source.dataset(EVAL, 3)]
        second = [x.numpy() for x, _ in source.dataset(EVAL, 3)]
        for a, b in zip(first, second):
            self.assertAllEqual(a, b)

    def test_decode_check_leaves_images_unchanged(self):
        def eval_images(check):
            options = PipelineOptions(check_decode=check)
            source = self._source(one_based_labels=True, options=options)
            return np.concatenate([x.numpy() for x, _ in source.dataset(EVAL, 4)])

        self.assertAllEqual(eval_images(True), eval_images(False))

    def test_missing_files_is_one_line_data_error(self):
        with self.assertRaisesRegex(DataError, "--data_dir=.*train-\\*"):
            ImageNetSource(os.path.join(self.dir, "empty"))


def corrupt_one_record(path, record, data=b"\xff\xd8\xff\xe0 truncated JPEG"):
    """Rewrites TFRecord file ``path`` with record ``record``'s image replaced by ``data``."""
    examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    examples[record].features.feature["image/encoded"].bytes_list.value[0] = data
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example.SerializeToString())


def count_blank(images):
    """How many images of a batch are all zeros (the stand-in of a corrupt record)."""
    return int(np.sum(np.max(images.numpy(), axis=(1, 2, 3)) == 0))


class CorruptRecordTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.get_temp_dir()
        self.written = write_imagenet_layout(self.dir)
        self.bad_eval = self.written["validation"][1][0]
        corrupt_one_record(self.bad_eval, 3)
        self.bad_train = self.written["train"][2][0]
        corrupt_one_record(self.bad_train, 0, data=b"not an image at all")

    def _source(self, skip, image_size=32):
        options = PipelineOptions(seed=3, skip_corrupt_records=skip)
        return ImageNetSource(
            self.dir,
            image_size=image_size,
            num_classes=10,
            one_based_labels=True,
            options=options,
            num_train_examples=20,
        )

    def test_corrupt_image_error_names_file_and_record(self):
        for image_size in (32, 80):  # both preprocessing paths
            with self.assertRaises(tf.errors.InvalidArgumentError) as caught:
                for _ in self._source(skip=False, image_size=image_size).dataset(EVAL, 4):
                    pass
            error = data_error_from(caught.exception)
            self.assertIsNotNone(error, str(caught.exception)[:500])
            self.assertIn(f"{self.bad_eval}", str(error))
            self.assertIn("record 3", str(error))
            self.assertIn("--skip_corrupt_records", str(error))
            self.assertNotIn("\n", str(error))

    def test_skip_drops_exactly_the_corrupt_records(self):
        source = self._source(skip=True)
        labels = np.concatenate([y.numpy() for _, y in source.dataset(EVAL, 4)])
        expected = [label for _, labels in self.written["validation"] for label in labels]
        del expected[5 + 3]  # file 1, record 3
        self.assertAllEqual(labels, expected)
        # Training never delivers the blank stand-in of the corrupt record: it is
        # 1 of 20 records, so 190 unfiltered draws would hold about ten of them.
        blank_images = 0
        for images, labels in source.dataset(TRAIN, 19).take(10):
            blank_images += count_blank(images)
            self.assertTrue(np.all((labels.numpy() >= 0) & (labels.numpy() < 10)))
        self.assertEqual(blank_images, 0)
        # The same stream without the filter does deliver it (the check above can fail).
        unfiltered = self._source(skip=True)
        unfiltered._drop_corrupt = lambda ds: ds.map(lambda image, label, *_: (image, label))
        blanks = [count_blank(images) for images, _ in unfiltered.dataset(TRAIN, 19).take(10)]
        self.assertGreater(sum(blanks), 0)

    def test_main_stops_or_skips_and_counts(self):
        common = [
            "--dataset=imagenet",
            f"--data_dir={self.dir}",
            "--one_based_labels",
            "--num_classes=10",
            *TINY_RESNET,
            "--image_size=32",
            "--batch_size=4",
            "--eval_batch_size=4",
            "--train_steps=2",
            "--steps_per_loop=2",
            "--method=vanilla",
        ]
        runs = {}
        for skip in (False, True):
            model_dir = os.path.join(self.get_temp_dir(), f"run_{skip}")
            runs[skip] = run_main(
                *common,
                f"--model_dir={model_dir}",
                f"--skip_corrupt_records={skip}",
                expect_ok=skip,
            )
        stopped, skipped = runs[False], runs[True]
        self.assertEqual(stopped.returncode, 2, stopped.stderr[-3000:])
        last_line = stopped.stderr.strip().splitlines()[-1]
        self.assertRegex(
            last_line,
            r'^error: undecodable image in file "[^"]*'
            r"(validation-00001\S* record 3|train-00002\S* record 0);",
        )
        self.assertEqual(skipped.returncode, 0, skipped.stderr[-3000:])
        self.assertRegex(
            skipped.stderr,
            r"skipped corrupt record: file .*validation-00001.* record 3 ; "
            r"corrupt records skipped so far: 1",
        )


class PreprocessingTest(tf.test.TestCase):
    def test_train_crop_windows_stay_inside_the_image(self):
        for height, width in [(40, 56), (300, 200), (17, 90)]:
            shape = tf.constant([height, width])
            for s in range(40):
                y, x, h, w = [
                    int(v)
                    for v in preprocessing.random_crop_window(shape, tf.constant([s, 7], tf.int64))
                ]
                self.assertGreater(h, 0)
                self.assertGreater(w, 0)
                self.assertLessEqual(y + h, height)
                self.assertLessEqual(x + w, width)
                self.assertGreaterEqual(min(y, x), 0)

    def test_train_and_eval_output_size_and_range(self):
        rng = np.random.default_rng(1)
        for encode in (_jpeg, _png):
            data = tf.constant(encode(rng, 50, 70))
            train = preprocessing.preprocess_for_train(data, 24, seed=tf.constant([1, 2]))
            evals = [preprocessing.preprocess_for_eval(data, 24) for _ in range(2)]
            self.assertEqual(train.shape, (24, 24, 3))
            self.assertEqual(evals[0].shape, (24, 24, 3))
            self.assertAllEqual(evals[0], evals[1])
            self.assertLessEqual(float(tf.reduce_max(train)), 255.0)
            self.assertGreaterEqual(float(tf.reduce_min(train)), 0.0)

    def test_eval_is_the_centre_crop(self):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[4:60, 4:60] = 200  # the 0.875 centre crop is exactly rows/cols 4..59
        data = tf.io.encode_png(pixels)
        image = preprocessing.preprocess_for_eval(data, 56).numpy()
        self.assertAllEqual(image, np.full((56, 56, 3), 200.0))


class ConverterTest(tf.test.TestCase):
    def test_round_trip_and_training(self):
        rng = np.random.default_rng(3)
        src = os.path.join(self.get_temp_dir(), "images")
        expected = collections.Counter()
        for label, name in enumerate(["cat", "dog", "emu"]):
            os.makedirs(os.path.join(src, name))
            for i in range(6):
                size = (30 + 7 * i, 40 + 5 * label)
                encode, ext = (_jpeg, "jpg") if i % 2 else (_png, "png")
                with open(os.path.join(src, name, f"{i}.{ext}"), "wb") as f:
                    f.write(encode(rng, *size))
                expected[label] += 1
        out = os.path.join(self.get_temp_dir(), "records")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "input_pipeline.convert",
                f"--src={src}",
                f"--out={out}",
                "--val_fraction=0.34",
                "--shards=2",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        self.assertIn("3 classes: 12 train and 6 validation", proc.stdout)
        with open(os.path.join(out, "labels.txt")) as f:
            self.assertEqual(f.read().split(), ["cat", "dog", "emu"])
        with open(os.path.join(out, "counts.json")) as f:
            counts = json.load(f)
        # Round-robin over two shards: six records each, by file name.
        train_files = {"train-00000-of-00002": 6, "train-00001-of-00002": 6}
        self.assertEqual(
            counts,
            {
                "num_classes": 3,
                "train": 12,
                "validation": 6,
                "train_files": train_files,
                "validation_files": {"validation-00000-of-00001": 6},
            },
        )

        source = FolderSource(out, image_size=32)
        self.assertEqual((source.num_classes, source.num_train_examples), (3, 12))
        read = collections.Counter()
        for split in ("train", "validation"):
            for _, labels in source._records(
                source.train_files if split == "train" else source.eval_files, None
            ).map(lambda f, i, r: source._parse(f, i, r)):
                read[int(labels)] += 1
        self.assertEqual(read, expected)

        model_dir = os.path.join(self.get_temp_dir(), "run")
        run_main(
            "--dataset=folder",
            f"--data_dir={out}",
            *TINY_RESNET,
            "--image_size=32",
            "--batch_size=4",
            "--eval_batch_size=4",
            "--train_steps=5",
            "--steps_per_loop=5",
            "--augment=autoaugment",
            "--autoaugment_policy=imagenet",
            f"--model_dir={model_dir}",
        )
        with open(os.path.join(model_dir, "summary.json")) as f:
            self.assertEqual(json.load(f)["train_steps"], 5)

    def test_bad_source_folder_is_one_line_error(self):
        empty = os.path.join(self.get_temp_dir(), "empty")
        os.makedirs(empty)
        proc = subprocess.run(
            [sys.executable, "-m", "input_pipeline.convert", f"--src={empty}", f"--out={empty}/o"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no class sub-folders", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)


if __name__ == "__main__":
    tf.test.main()
