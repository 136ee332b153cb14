"""The converter on generated trees as data ships: layouts, bad files, workers, resume.

Every image of class k is a solid colour COLOURS[k] (plus a little noise), so a
record's decoded pixels say which label it must carry.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from input_pipeline import convert
from input_pipeline.conversion import shards
from tests.child_process import TINY_RESNET, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30)]
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/class/text": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def pixels(label, seed, size=(24, 32)):
    rng = np.random.default_rng(seed)
    noise = rng.integers(-10, 10, (*size, 3))
    return np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)


def encoded(label, seed, fmt="JPEG", mode="RGB"):
    image = Image.fromarray(pixels(label, seed)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_trees(root):
    """train/ (classes ant, bee, cat, dog; dog empty) with every kind of file, and val/."""
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    put(f"{train}/ant/a0.JPEG", encoded(0, 1))
    put(f"{train}/ant/nested/deeper/a1.jpg", encoded(0, 2))
    put(f"{train}/ant/a2.Jpeg", encoded(0, 3))
    put(f"{train}/ant/cmyk.jpg", encoded(0, 4, mode="CMYK"))
    put(f"{train}/ant/.DS_Store", b"\0\0\0\1Bud1")
    put(f"{train}/ant/notes.txt", b"not an image")
    put(f"{train}/bee/b0.png", encoded(1, 5, fmt="PNG"))
    put(f"{train}/bee/b1.JPEG", encoded(1, 6, fmt="PNG"))
    put(f"{train}/bee/grey.jpg", encoded(1, 7, mode="L"))
    put(f"{train}/bee/b2.jpg", encoded(1, 8))
    put(f"{train}/cat/c0.jpg", encoded(2, 9))
    put(f"{train}/cat/c1.jpg", encoded(2, 10))
    put(f"{train}/cat/trunc.jpg", encoded(2, 11)[:300])
    put(f"{train}/cat/zero.jpg", b"")
    os.makedirs(f"{train}/dog")
    for label, name in enumerate(["ant", "bee", "cat"]):
        for i in range(2):
            put(f"{val}/{name}/v{i}.jpg", encoded(label, 100 + 10 * label + i))
    return train, val


def records(out, prefix):
    files = sorted(tf.io.gfile.glob(os.path.join(out, f"{prefix}-*")))
    return [tf.io.parse_single_example(r, FEATURES) for r in tf.data.TFRecordDataset(files)]


def shard_bytes(out):
    names = sorted(n for n in os.listdir(out) if n.startswith(("train-", "validation-")))
    result = {}
    for name in names:
        with open(os.path.join(out, name), "rb") as f:
            result[name] = f.read()
    return result


class ConvertTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        cls.train, cls.val = make_trees(cls.root)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def out(self, name):
        return os.path.join(self.get_temp_dir(), name)

    def assert_colour_is_label(self, out, prefix):
        """Every record decodes with the training decode to 3 channels, in its label's colour."""
        found = records(out, prefix)
        for example in found:
            data = example["image/encoded"]
            shape = tf.image.extract_jpeg_shape(data)
            image = tf.image.decode_and_crop_jpeg(data, [0, 0, shape[0], shape[1]], channels=3)
            self.assertEqual(image.shape[-1], 3)
            mean = tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1]).numpy()
            nearest = int(np.argmin([np.abs(mean - c).sum() for c in COLOURS]))
            if b"grey" not in example["image/filename"].numpy():  # no colour left to tell
                self.assertEqual(nearest, int(example["image/class/label"]))
        return found

    def test_train_and_val_trees_counts_labels_and_report(self):
        """Counts (each shard's its records), labels and the report exactly. Catches:
        extensions matched in one case (a0.JPEG, a2.Jpeg lost), nested folders not
        walked (a1 lost), a CMYK or greyscale JPEG or a PNG (under any name) stored as
        is (decode_and_crop_jpeg fails), a bad file stopping the conversion or dropped
        without a report line, hidden and text files read as images or not counted, an
        empty class shifting the labels."""
        out = self.out("trees")
        counts = convert.convert_trees(
            self.train, self.val, out, shards=2, max_skipped_fraction=0.2
        )
        in_files = {
            name: sum(1 for _ in tf.data.TFRecordDataset(os.path.join(out, name)))
            for name in sorted(os.listdir(out))
            if name.startswith(("train-", "validation-"))
        }
        self.assertEqual(
            counts,
            {
                "num_classes": 4,
                "train": 10,
                "validation": 6,
                "train_files": {k: v for k, v in in_files.items() if k.startswith("train")},
                "validation_files": {"validation-00000-of-00001": 6},
            },
        )
        self.assertLen(in_files, 3)
        with open(os.path.join(out, "labels.txt")) as f:
            self.assertEqual(f.read().split(), ["ant", "bee", "cat", "dog"])
        with open(os.path.join(out, "conversion_report.json")) as f:
            report = json.load(f)
        t = self.train
        self.assertEqual(
            sorted(map(tuple, report["reencoded"])),
            [
                (f"{t}/ant/cmyk.jpg", "CMYK JPEG"),
                (f"{t}/bee/b0.png", "PNG"),
                (f"{t}/bee/b1.JPEG", "PNG named .JPEG"),
                (f"{t}/bee/grey.jpg", "greyscale JPEG"),
            ],
        )
        self.assertEqual(
            sorted(map(tuple, report["skipped"])),
            [
                (f"{t}/cat/trunc.jpg", "truncated or corrupt JPEG"),
                (f"{t}/cat/zero.jpg", "empty file"),
            ],
        )
        self.assertEqual(
            sorted(map(tuple, report["ignored"])),
            [
                (f"{t}/ant/.DS_Store", "hidden file"),
                (f"{t}/ant/notes.txt", "not an image extension (.jpg, .jpeg, .png)"),
            ],
        )
        self.assertEqual(report["empty_classes"], [f"{t}/dog"])
        train = self.assert_colour_is_label(out, "train")
        names = sorted(e["image/filename"].numpy().decode() for e in train)
        self.assertIn("ant/nested/deeper/a1.jpg", names)
        self.assertIn("ant/a0.JPEG", names)
        self.assertLen(self.assert_colour_is_label(out, "validation"), 6)

    def test_too_many_skipped_files_fail_in_one_line(self):
        """2 of 18 unreadable with the default fraction. Catches: a fraction never checked,
        or checked against the written images instead of every image found."""
        with self.assertRaisesRegex(convert.ConvertError, "2 of 18 images could not be read"):
            convert.convert_trees(self.train, self.val, self.out("strict"), shards=2)

    def test_a_val_class_missing_from_train_is_refused_in_one_line(self):
        """Catches: classes taken from the union of both trees (labels of train shift)."""
        val = self.out("val_extra")
        shutil.copytree(self.val, val)
        put(f"{val}/zebra/z.jpg", encoded(0, 50))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "input_pipeline.convert",
                f"--train_dir={self.train}",
                f"--val_dir={val}",
                f"--out={self.out('refused')}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        self.assertLen(lines, 1)
        self.assertIn("'zebra'", lines[0])
        self.assertNotIn("Traceback", proc.stderr)

    def make_imagenet(self, val_order):
        """train/ of three synsets; a flat val/ whose images are of classes ``val_order``."""
        root = self.out("ilsvrc")
        shutil.rmtree(root, ignore_errors=True)
        synsets = ["n01440764", "n01443537", "n01484850"]
        for label, synset in enumerate(synsets):
            for i in range(2):
                put(f"{root}/train/{synset}/{synset}_{i}.JPEG", encoded(label, 200 + 3 * label + i))
        rows, ids = ["ImageId,PredictionString"], []
        for index, label in enumerate(val_order, start=1):
            image_id = f"ILSVRC2012_val_{index:08d}"
            put(f"{root}/val/{image_id}.JPEG", encoded(label, 300 + index))
            rows.append(f"{image_id},{synsets[label]} 1 2 3 4 {synsets[label]} 5 6 7 8")
            ids.append(3 - label)  # the devkit's IDs, here in reverse synset order
        put(f"{root}/LOC_val_solution.csv", ("\n".join(rows) + "\n").encode())
        names = [f"{s} name {i}" for i, s in enumerate(synsets)]
        put(f"{root}/LOC_synset_mapping.txt", ("\n".join(names) + "\n").encode())
        put(f"{root}/gt.txt", ("\n".join(map(str, ids)) + "\n").encode())
        put(f"{root}/order.txt", ("\n".join(reversed(synsets)) + "\n").encode())
        return root

    def test_imagenet_flat_val_lands_in_its_class(self):
        """A flat val/ labelled by LOC_val_solution.csv, and by the devkit's ground truth
        with its own (reversed) synset order, 1-based. Catches: val labels taken from the
        file order or the ground truth's IDs read in sorted synset order (a shuffled
        synset order), class names not stored, --one_based_labels ignored."""
        root = self.make_imagenet(val_order=[2, 0, 1, 1, 2])
        out = self.out("ilsvrc_out")
        counts = convert.convert_imagenet(root, out, shards=2, val_shards=1)
        self.assertEqual((counts["train"], counts["validation"]), (6, 5))
        val = self.assert_colour_is_label(out, "validation")
        self.assertEqual([int(e["image/class/label"]) for e in val], [2, 0, 1, 1, 2])
        self.assertEqual(val[0]["image/class/text"].numpy(), b"name 2")
        out = self.out("devkit_out")
        os.remove(os.path.join(root, "LOC_val_solution.csv"))
        convert.convert_imagenet(
            root,
            out,
            shards=2,
            val_shards=1,
            val_ground_truth=os.path.join(root, "gt.txt"),
            synset_order=os.path.join(root, "order.txt"),
            one_based_labels=True,
        )
        val = records(out, "validation")
        self.assertEqual([int(e["image/class/label"]) for e in val], [3, 1, 2, 2, 3])
        # --dataset=imagenet reads them as they are (1-based labels, its reader's option).
        from input_pipeline.base import EVAL
        from input_pipeline.imagenet import ImageNetSource

        source = ImageNetSource(out, image_size=16, num_classes=3, one_based_labels=True)
        labels = [
            int(label)
            for _, batch_labels in source.dataset(EVAL, 5)
            for label in batch_labels.numpy()
        ]
        self.assertEqual(labels, [2, 0, 1, 1, 2])

    def test_one_and_two_workers_write_the_same_bytes(self):
        """Catches: shards whose bytes depend on the worker process that wrote them (a
        record's feature map serialised in the process's string-hash order)."""
        kwargs = {"shards": 3, "val_shards": 2, "max_skipped_fraction": 0.2}
        one, two = self.out("w1"), self.out("w2")
        convert.convert_trees(self.train, self.val, one, num_workers=1, **kwargs)
        convert.convert_trees(self.train, self.val, two, num_workers=2, **kwargs)
        self.assertEqual(shard_bytes(one), shard_bytes(two))
        with (
            open(os.path.join(two, "counts.json")) as f,
            open(os.path.join(one, "counts.json")) as g,
        ):
            self.assertEqual(json.load(f), json.load(g))
        # So a run's data fingerprint is the same whichever conversion it reads.
        from input_pipeline.imagenet import FolderSource

        self.assertEqual(
            FolderSource(one, image_size=16).fingerprint(),
            FolderSource(two, image_size=16).fingerprint(),
        )

    def test_killed_conversion_restarted_gives_the_same_files(self):
        """Killed in the middle of its third shard, then restarted. Catches: a shard
        written in place (a half shard left under its final name and kept), complete
        shards written again, and a kept shard never proved to be the same work (one
        made from an image since changed is reused)."""
        kwargs = {"shards": 4, "val_shards": 1, "max_skipped_fraction": 0.2}
        whole, killed = self.out("whole"), self.out("killed")
        convert.convert_trees(self.train, self.val, whole, **kwargs)
        real_write, calls = shards.write, []

        def dying_write(task, out, progress=None):
            calls.append(task.name)
            if len(calls) == 3:

                def die(n):
                    raise KeyboardInterrupt

                return real_write(task, out, die)
            return real_write(task, out, progress)

        shards.write = dying_write
        try:
            with self.assertRaises(KeyboardInterrupt):
                convert.convert_trees(self.train, self.val, killed, **kwargs)
        finally:
            shards.write = real_write
        self.assertLen(
            [n for n in os.listdir(killed) if n.startswith("train-")], 2
        )  # the third is only a temporary file
        first = os.path.join(killed, calls[0])
        os.utime(first, (1, 1))  # a rewrite would change it
        convert.convert_trees(self.train, self.val, killed, **kwargs)
        self.assertEqual(shard_bytes(killed), shard_bytes(whole))
        self.assertEqual(os.stat(first).st_mtime, 1)
        with open(os.path.join(killed, "conversion_report.json")) as f:
            self.assertEqual(json.load(f)["resumed_shards"], calls[:2])

        # An input changed since: the shard holding it is rewritten from it, not reused.
        tree = self.out("changed")
        shutil.copytree(self.root, tree)
        convert.convert_trees(f"{tree}/train", f"{tree}/val", self.out("changed_out"), **kwargs)
        put(f"{tree}/train/cat/c0.jpg", encoded(2, 999))
        convert.convert_trees(f"{tree}/train", f"{tree}/val", self.out("changed_out"), **kwargs)
        fresh = self.out("fresh")
        convert.convert_trees(f"{tree}/train", f"{tree}/val", fresh, **kwargs)
        self.assertEqual(shard_bytes(self.out("changed_out")), shard_bytes(fresh))

    def test_progress_line_has_a_bar_rate_and_eta(self):
        """Catches: a bar filled by shards instead of images, or no rate or ETA."""
        import io
        import re

        from input_pipeline.conversion import parallel

        stream = io.StringIO()
        progress = parallel.Progress(100, 4, interval=0.0, stream=stream)
        progress.show(25, 3, force=True)
        line = stream.getvalue().strip()
        self.assertTrue(line.startswith("[" + "#" * 6 + "." * 18 + "] 25/100 images"), line)
        self.assertRegex(line, r"[\d,.]+ images/s, ETA (\d\d:\d\d:\d\d|\?) \(3/4 shards\)")
        self.assertIsNone(re.search("\n", line))

    def test_converted_train_and_val_trees_train_with_main(self):
        """End to end: --dataset=folder trains and evaluates on a train/ + val/ conversion.
        Catches: records the reader cannot parse (a label under another feature name)."""
        out = self.out("main_data")
        convert.convert_trees(self.train, self.val, out, shards=2, max_skipped_fraction=0.2)
        model_dir = self.out("run")
        run_main(
            "--dataset=folder",
            f"--data_dir={out}",
            *TINY_RESNET,
            "--image_size=32",
            "--batch_size=4",
            "--eval_batch_size=2",
            "--train_steps=4",
            "--steps_per_loop=2",
            f"--model_dir={model_dir}",
        )
        with open(os.path.join(model_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["train_steps"], 4)


if __name__ == "__main__":
    tf.test.main()
