"""The selection set of the record sources (``folder``, ``imagenet``, ``tfds:NAME``).

Every training image of the folder data carries its id in its colour (one
uniform colour per image: crops, flips and resizes keep it), so a test reads
which examples a stream delivers whatever the preprocessing.
"""

import collections
import glob
import json
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags as absl_flags

import flags as conadv_flags
from conadv.run_config import RunConfig
from input_pipeline import convert, registry, selection_table
from input_pipeline.base import EVAL, SELECTION, TRAIN, TRAIN_EVAL, DataError, PipelineOptions
from input_pipeline.imagenet import FEATURES, FolderSource, ImageNetSource
from input_pipeline.records import ALL_TRAINING
from input_pipeline.selection import Selection
from tests import tfds_test_dataset
from tests.child_process import TINY_RESNET, run_main

#: Images per class (unequal); a tenth of each goes to validation.
CLASS_SIZES = {"ant": 50, "bee": 30, "cow": 20}
HELD = 12  # of the 90 training images: quotas 6, 4, 2
SHARDS = 4


def _colour(image_id: int) -> list[int]:
    """The id in steps of 16 (a JPEG re-encoding moves a uniform colour by a few levels)."""
    return [(image_id % 16) * 16 + 8, (image_id // 16) * 16 + 8, 128]


def image_ids(images) -> list[int]:
    """The ids of a batch of images (float or uint8 ``[B, H, W, 3]``)."""
    mean = np.asarray(images, np.float64).mean(axis=(1, 2))
    low, high = np.round((mean[:, 0] - 8) / 16), np.round((mean[:, 1] - 8) / 16)
    return (low + 16 * high).astype(int).tolist()


def write_id_folder(root: str) -> str:
    """Class folders of uniform PNGs, image ``i`` coloured by ``i``, converted into
    ``SHARDS`` training shards; returns the records' folder."""
    src, image_id = os.path.join(root, "images"), 0
    for name, size in CLASS_SIZES.items():
        os.makedirs(os.path.join(src, name))
        for k in range(size):
            pixels = np.zeros((12, 12, 3), np.uint8) + np.array(_colour(image_id), np.uint8)
            with open(os.path.join(src, name, f"{k}.png"), "wb") as f:
                f.write(tf.io.encode_png(pixels).numpy())
            image_id += 1
    out = os.path.join(root, "records")
    convert.convert(src, out, val_fraction=0.1, shards=SHARDS, seed=1)
    return out


def stored_records(data_dir: str) -> list[tuple[str, int, int, int]]:
    """``(file base name, index in file, label, id)`` of every training record, read
    without the source."""
    rows = []
    for path in sorted(glob.glob(os.path.join(data_dir, "train-*"))):
        for index, record in enumerate(tf.data.TFRecordDataset(path)):
            example = tf.io.parse_single_example(record, FEATURES)
            image = tf.io.decode_image(example["image/encoded"], channels=3)
            label = int(example["image/class/label"])
            rows.append((os.path.basename(path), index, label, image_ids(image[None])[0]))
    return rows


def ids_of(dataset, batches=None) -> list[int]:
    taken = dataset if batches is None else dataset.take(batches)
    return [i for images, _ in taken for i in image_ids(images)]


class QuotaTest(tf.test.TestCase):
    def test_quotas_are_exact_proportional_and_leave_every_class_an_example(self):
        """Catches: quotas that do not sum to the count; shares off by more than one;
        a class's only training example held out (a remainder of 0.5 rounded up, so the
        class is in the selection set but never trained on); a count the classes cannot
        give taken silently."""
        for counts, held in (([10] * 10, 33), ([3, 5, 7], 7), ([1, 99], 50), ([1, 1, 1, 97], 50)):
            quotas = Selection(held).quotas(np.array(counts))
            self.assertEqual(int(quotas.sum()), held, counts)
            self.assertTrue(all(q <= c - 1 for q, c in zip(quotas, counts)), (counts, quotas))
            if min(counts) > 1:  # no class at its last example: within one of its share
                share = held * np.array(counts) / sum(counts)
                self.assertLess(np.abs(quotas - share).max(), 1.0, counts)
        with self.assertRaisesRegex(DataError, "keep one example of each class") as caught:
            Selection(2).quotas(np.array([1, 1, 1, 1]))
        self.assertNotIn("\n", str(caught.exception))


class FolderSelectionTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="selection_")
        cls.cache = mock.patch.object(selection_table, "CACHE_DIR", os.path.join(cls.root, "cache"))
        cls.cache.start()
        cls.data_dir = write_id_folder(cls.root)
        cls.stored = stored_records(cls.data_dir)
        cls.train_ids = {row[3] for row in cls.stored}

    @classmethod
    def tearDownClass(cls):
        cls.cache.stop()
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def source(self, seed=0, held=HELD, selection_seed=0, deterministic=False):
        options = PipelineOptions(
            seed=seed,
            deterministic=deterministic,
            selection_examples=held,
            selection_seed=selection_seed,
        )
        return FolderSource(self.data_dir, image_size=16, options=options)

    def expected_held(self, selection_seed=0) -> set[int]:
        """The ids ``Selection.held_out`` chooses from the records' stored keys."""
        keys = [f"{name}/{index}" for name, index, _, _ in self.stored]
        labels = np.array([row[2] for row in self.stored])
        mask = Selection(HELD, selection_seed).held_out(keys, labels, 3)
        return {row[3] for row, held in zip(self.stored, mask) if held}

    def test_the_records_carry_distinct_ids(self):
        self.assertLen(self.stored, 90)
        self.assertLen(self.train_ids, 90)

    def test_selection_is_never_trained_on_and_nothing_is_lost(self):
        """Catches: the filter not applied to TRAIN or to TRAIN_EVAL; the keep/hold sense
        inverted on one split; the labels read when the source is built."""
        with mock.patch.object(selection_table, "compute", side_effect=AssertionError):
            unread = self.source(selection_seed=9)  # counts known without reading the data
        self.assertEqual((unread.num_train_examples, unread.num_selection_examples), (78, HELD))
        source = self.source()
        selection = ids_of(source.dataset(SELECTION, 5))
        self.assertLen(selection, HELD)
        self.assertLen(set(selection), HELD)
        kept = self.train_ids - set(selection)
        for seed in (0, 1, 2):
            trained = ids_of(self.source(seed=seed).dataset(TRAIN, 8), 20)  # 160 > 2 epochs
            self.assertEqual(set(trained), kept, seed)  # none held out, none lost
            # Each epoch reads each kept example once.
            self.assertEqual(set(collections.Counter(trained[:78]).values()), {1}, seed)
        train_eval = ids_of(source.dataset(TRAIN_EVAL, 8))
        self.assertCountEqual(train_eval, kept)
        self.assertLen(ids_of(source.dataset(EVAL, 8)), 10)

    def test_same_part_for_every_seed_and_method_stratified(self):
        """Catches: keyed by stream position (the shuffled index); the run seed used as the
        selection seed; quotas not stratified."""
        expected = self.expected_held()
        for seed, deterministic in ((0, False), (7, True), (123, False)):
            source = self.source(seed=seed, deterministic=deterministic)
            self.assertEqual(set(ids_of(source.dataset(SELECTION, 5))), expected, seed)
        for args in (["--method=vanilla", "--seed=3"], ["--method=conadv", "--seed=4"]):
            values = absl_flags.FlagValues()
            conadv_flags.define_all(values)
            values(
                [
                    "prog",
                    *args,
                    "--dataset=folder",
                    f"--data_dir={self.data_dir}",
                    "--image_size=16",
                    f"--selection_examples={HELD}",
                    "--model_dir=/tmp/unused",
                ]
            )
            source = RunConfig.from_flags(values).data.build_source()
            self.assertEqual(set(ids_of(source.dataset(SELECTION, 5))), expected, args)
        # Exactly the quotas of every class.
        label_of = {row[3]: row[2] for row in self.stored}
        class_counts = np.bincount([row[2] for row in self.stored], minlength=3)
        quotas = Selection(HELD).quotas(class_counts)
        self.assertEqual(quotas.tolist(), [6, 4, 2])
        self.assertEqual(np.bincount([label_of[i] for i in expected]).tolist(), [6, 4, 2])
        # Another --selection_seed: another part, the same quotas.
        other = set(ids_of(self.source(selection_seed=1).dataset(SELECTION, 5)))
        self.assertEqual(other, self.expected_held(selection_seed=1))
        self.assertNotEqual(other, expected)
        self.assertEqual(np.bincount([label_of[i] for i in other]).tolist(), [6, 4, 2])

    def test_resumed_stream_continues_the_uninterrupted_one(self):
        """Catches: ``_epoch_record_count`` counting the held-out records (the resumed stream
        starts at the wrong record once past the first epoch), per file and per record."""
        contexts = [
            (None, 8, 12),  # 96 of 78 records an epoch: epoch 1
            (tf.distribute.InputContext(2, 1, 2), 4, 10),  # whole files 1 and 3
            (tf.distribute.InputContext(5, 1, 5), 4, 5),  # every 5th record: 16 an epoch
        ]
        for context, batch, start in contexts:
            source = self.source(seed=3, deterministic=True)
            straight = source.dataset(TRAIN, batch, context).take(start + 6)
            straight = [image_ids(images) for images, _ in straight][start:]
            resumed = source.dataset(TRAIN, batch, context, start_step=start).take(6)
            self.assertEqual([image_ids(images) for images, _ in resumed], straight, start)

    def test_input_pipelines_share_the_selection(self):
        """Catches: SELECTION not sharded among the input pipelines (each evaluating all of
        it), or sharded so that some held-out records are read by none."""
        whole = ids_of(self.source().dataset(SELECTION, 5))
        for pipelines in (2, 5):  # whole files; every 5th record
            parts = []
            for i in range(pipelines):
                context = tf.distribute.InputContext(pipelines, i, pipelines)
                parts += ids_of(self.source().dataset(SELECTION, 5, context))
            self.assertCountEqual(parts, whole)

    def test_the_pass_is_remembered_and_checked(self):
        """Catches: the label pass made again for each source, or remembered by the data's
        path (a copy elsewhere holds out the same records, from the same table); a count
        that disagrees with the files, or a hash collision, accepted silently."""
        self.source().dataset(SELECTION, 5)
        copy = os.path.join(self.root, "copy")
        shutil.copytree(self.data_dir, copy)
        with mock.patch.object(selection_table, "compute", side_effect=AssertionError):
            self.assertEqual(set(ids_of(self.source().dataset(SELECTION, 5))), self.expected_held())
            moved = FolderSource(copy, image_size=16, options=self.source().options)
            self.assertEqual(set(ids_of(moved.dataset(SELECTION, 5))), self.expected_held())
        per_file = collections.Counter(name for name, _, _, _ in self.stored)
        files = {name: (count, 0) for name, count in per_file.items()}
        first = sorted(files)[0]
        files[first] = (per_file[first], HELD - 1)
        collision = selection_table.SelectionTable(np.zeros(3, np.int64), files)
        with mock.patch.object(selection_table, "compute", return_value=collision):
            with self.assertRaisesRegex(DataError, "not 12 .a hash collision"):
                self.source(selection_seed=5).dataset(TRAIN, 8)
        wrong = ImageNetSource(
            self.data_dir,
            image_size=16,
            num_classes=3,
            num_train_examples=100,
            options=PipelineOptions(selection_examples=HELD),
        )
        with self.assertRaisesRegex(DataError, "hold 90 records, not the 100") as caught:
            wrong.dataset(TRAIN, 8)
        self.assertNotIn("\n", str(caught.exception))

    def test_a_remembered_table_must_be_of_these_files_and_this_rule(self):
        """Catches: a remembered table served to data of other files (a re-preparation with
        other shards, whose fingerprint may not change) or whose files hold other record
        counts; a cache key without the rule's seed, the classes, the label offset or the
        table's format (each makes another table)."""
        source = self.source(selection_seed=7)
        source.dataset(SELECTION, 5)
        path = selection_table._cache_path(source)
        with open(path) as f:
            remembered = json.load(f)
        name = sorted(remembered["files"])[0]
        records = remembered["files"][name][0]
        renamed = {**remembered["files"], f"{name}-other": remembered["files"][name]}
        del renamed[name]
        recounted = {**remembered["files"], name: [records + 1, 0]}
        for tampered in (renamed, recounted):
            with open(path, "w") as f:
                json.dump({**remembered, "files": tampered}, f)
            with self.assertRaisesRegex(DataError, "lists other training files") as caught:
                self.source(selection_seed=7).dataset(SELECTION, 5)
            self.assertNotIn("\n", str(caught.exception))
        keys = {path}
        for other in (self.source(selection_seed=8), self.source(held=HELD + 1)):
            keys.add(selection_table._cache_path(other))
        fewer_classes = FolderSource(self.data_dir, 16, source.options, num_classes=4)
        keys.add(selection_table._cache_path(fewer_classes))
        with mock.patch.object(selection_table, "FORMAT", selection_table.FORMAT + 1):
            keys.add(selection_table._cache_path(source))
        self.assertLen(keys, 5)

    def test_main_evaluates_the_selection_and_trains_without_it(self):
        """Catches: main.py's precise BatchNorm statistics (TRAIN_EVAL) or summary reading the
        held-out examples."""
        model_dir = os.path.join(self.root, "run")
        proc = run_main(
            "--dataset=folder",
            f"--data_dir={self.data_dir}",
            *TINY_RESNET,
            "--method=vanilla",
            "--image_size=16",
            "--batch_size=8",
            "--eval_batch_size=8",
            "--train_steps=2",
            "--steps_per_loop=2",
            "--precise_bn_batches=100",
            f"--selection_examples={HELD}",
            f"--model_dir={model_dir}",
            env={"HOME": os.path.join(self.root, "home")},
        )
        with open(os.path.join(model_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["selection_examples"], HELD)
        self.assertRegex(proc.stderr, r"Precise BatchNorm statistics .* 78 training images")


class TFDSSelectionTest(tf.test.TestCase):
    """14 training examples (labels i % 3: 5, 5, 4) in 4 files of unequal length."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="selection_tfds_")
        cls.cache = mock.patch.object(selection_table, "CACHE_DIR", os.path.join(cls.root, "cache"))
        cls.cache.start()
        tfds_test_dataset.ConadvTestShapes(data_dir=cls.root).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=4)
        )

    @classmethod
    def tearDownClass(cls):
        cls.cache.stop()
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def source(self, seed=1):
        options = PipelineOptions(seed=seed, deterministic=True, selection_examples=4)
        return registry.get_source(
            f"tfds:{tfds_test_dataset.NAME}", image_size=16, data_dir=self.root, options=options
        )

    @staticmethod
    def keys(records):
        return [(f.numpy().decode(), int(i)) for f, i, _ in records]

    def test_selection_held_out_by_key_with_exact_quotas(self):
        """Catches: the filter not applied, or keyed by another name than the file part of
        ``tfds_id``; quotas not stratified; the epoch length not less the held-out records."""
        source = self.source()
        self.assertEqual((source.num_train_examples, source.num_selection_examples), (10, 4))
        everything = source._split_records(ALL_TRAINING, None)
        rows = [(f.numpy().decode(), int(i), int(r["label"])) for f, i, r in everything]
        self.assertLen(rows, 14)
        held = Selection(4).held_out([f"{f}/{i}" for f, i, _ in rows], [r[2] for r in rows], 3)
        expected = {(f, i) for (f, i, _), h in zip(rows, held) if h}
        self.assertEqual(np.bincount([r[2] for r, h in zip(rows, held) if h]).tolist(), [2, 1, 1])
        for seed in (1, 2):
            source = self.source(seed)
            selection = self.keys(source._split_records(SELECTION, None))
            self.assertEqual(set(selection), expected)
            epoch = tf.constant(0, tf.int64)
            trained = self.keys(source._split_records(TRAIN, None, epoch=epoch))
            self.assertEqual(set(trained) | expected, {(f, i) for f, i, _ in rows})
            self.assertLen(trained, 10)
        self.assertLen(ids_of_labels(source.dataset(SELECTION, 3)), 4)
        # A resumed run's epoch: the metadata's counts less the held-out records.
        for context in (None, tf.distribute.InputContext(3, 0), tf.distribute.InputContext(5, 4)):
            read = source._split_records(TRAIN, context, epoch=tf.constant(0, tf.int64))
            self.assertEqual(source._epoch_record_count(context), len(self.keys(read)))


def ids_of_labels(dataset) -> list[int]:
    return [int(label) for _, labels in dataset for label in labels]
