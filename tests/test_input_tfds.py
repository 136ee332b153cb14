"""``--dataset=tfds:NAME`` on a TFDS dataset prepared locally by the test."""

import collections
import glob
import json
import os
import shutil

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import epochs, registry
from input_pipeline.base import EVAL, TRAIN, DataError, PipelineOptions
from tests import tfds_test_dataset
from tests.child_process import TINY_RESNET, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = f"tfds:{tfds_test_dataset.NAME}"


class TFDSSourceTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tempfile

        cls.data_dir = tempfile.mkdtemp(prefix="tfds_")
        tfds_test_dataset.prepare(cls.data_dir)
        # The same examples in 4 files of unequal length (4, 3, 3, 4 training records).
        cls.sharded_dir = tempfile.mkdtemp(prefix="tfds_sharded_")
        tfds_test_dataset.ConadvTestShapes(data_dir=cls.sharded_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=4)
        )

    def source(self, data_dir=None, deterministic=False, **kwargs):
        options = PipelineOptions(seed=1, deterministic=deterministic)
        return registry.get_source(
            DATASET, image_size=32, data_dir=data_dir or self.data_dir, options=options, **kwargs
        )

    def test_reads_counts_labels_and_batches(self):
        source = self.source()
        self.assertEqual(source.num_classes, 3)
        self.assertEqual(source.num_train_examples, 14)
        self.assertEqual(source.num_eval_examples, 7)
        eval_labels = np.concatenate([y.numpy() for _, y in source.dataset(EVAL, 3)])
        self.assertCountEqual(eval_labels.tolist(), tfds_test_dataset.labels("test"))
        images, labels = next(iter(source.dataset(TRAIN, 5)))
        self.assertEqual(images.shape, (5, 32, 32, 3))
        self.assertEqual(images.dtype, tf.float32)
        self.assertTrue(set(labels.numpy().tolist()) <= {0, 1, 2})

    def test_two_input_pipelines_cover_the_split_once(self):
        source = self.source()
        seen = collections.Counter()
        for host in range(2):
            context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=host)
            for filename, index, _ in source._split_records(EVAL, context):
                seen[(filename.numpy(), int(index))] += 1
        self.assertLen(seen, 7)
        self.assertEqual(set(seen.values()), {1})

    def test_file_counts_are_the_records_in_each_file(self):
        source = self.source(self.sharded_dir)
        for split, pattern in ((TRAIN, "*-train.tfrecord-*"), (EVAL, "*-test.tfrecord-*")):
            counts = source.file_counts(split)
            on_disk = glob.glob(os.path.join(self.sharded_dir, "*", "*", pattern))
            self.assertCountEqual([name for name, _ in counts], on_disk)
            self.assertLen(on_disk, 4)
            for name, records in counts:
                read = epochs.count_records(tf.data.TFRecordDataset(name))
                self.assertEqual(records, read, name)
        train = [records for _, records in source.file_counts(TRAIN)]
        self.assertEqual(sum(train), 14)
        self.assertGreater(len(set(train)), 1)  # unequal files: a mix-up would show

    def test_resume_counts_an_epoch_without_reading_the_split(self):
        def key(context):
            return (context.num_input_pipelines, context.input_pipeline_id) if context else None

        # 3 pipelines take whole files (0 and 3, 1, 2), 5 take every 5th record.
        contexts = [None] + [
            tf.distribute.InputContext(num_input_pipelines=n, input_pipeline_id=i)
            for n, i in ((3, 0), (3, 1), (3, 2), (5, 0), (5, 4))
        ]
        source = self.source(self.sharded_dir)
        first_epoch = tf.constant(0, tf.int64)
        read = {
            key(c): epochs.count_records(source._split_records(TRAIN, c, epoch=first_epoch))
            for c in contexts
        }
        self.assertEqual(read[None], 14)
        self.assertEqual([read[(3, i)] for i in range(3)], [8, 3, 3])
        self.assertEqual([read[(5, 0)], read[(5, 4)]], [3, 2])
        # The prepared dataset without its training files: only the metadata can answer.
        bare = os.path.join(self.get_temp_dir(), "bare")
        shutil.copytree(self.sharded_dir, bare)
        for name in glob.glob(os.path.join(bare, "*", "*", "*-train.tfrecord-*")):
            os.remove(name)
        bare_source = self.source(bare)
        for context in contexts:
            self.assertEqual(bare_source._epoch_record_count(context), read[key(context)])
        # A resumed training stream opens there without reading a record.
        bare_source.dataset(TRAIN, 4, tf.distribute.InputContext(3, 0), start_step=3)

    def test_resumed_stream_continues_the_uninterrupted_one(self):
        # Pipeline 0 of 3 has 8 records: 2 batches of 4 an epoch, so step 5 (record 20)
        # is the second batch of epoch 2; a wrong epoch length puts it elsewhere.
        context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=0)
        source = self.source(self.sharded_dir, deterministic=True)

        def batches(start_step, count):
            ds = source.dataset(TRAIN, 4, context, start_step=start_step).take(count)
            return [(y.numpy().tolist(), tf.reduce_sum(x, [1, 2, 3]).numpy()) for x, y in ds]

        whole, resumed = batches(0, 8), batches(5, 3)
        for (labels, sums), (resumed_labels, resumed_sums) in zip(whole[5:], resumed, strict=True):
            self.assertEqual(resumed_labels, labels)
            self.assertAllClose(resumed_sums, sums, rtol=1e-6)

    def test_unprepared_dataset_is_an_error_not_a_download(self):
        empty = self.get_temp_dir()
        with self.assertRaisesRegex(DataError, "not prepared.*--tfds_download") as caught:
            registry.get_source("tfds:mnist", data_dir=empty)
        self.assertNotIn("\n", str(caught.exception))
        self.assertEqual(os.listdir(empty), [])

    def test_unknown_dataset_is_one_line_error(self):
        with self.assertRaisesRegex(DataError, "tfds:no_such_set_xyz") as caught:
            registry.get_source("tfds:no_such_set_xyz", data_dir=self.get_temp_dir())
        self.assertNotIn("\n", str(caught.exception))

    def test_main_trains_on_it_with_randaugment(self):
        model_dir = os.path.join(self.get_temp_dir(), "run")
        run_main(
            f"--dataset={DATASET}",
            f"--data_dir={self.data_dir}",
            *TINY_RESNET,
            "--image_size=32",
            "--batch_size=4",
            "--eval_batch_size=4",
            "--train_steps=3",
            "--steps_per_loop=3",
            "--augment=randaugment",
            "--randaugment_magnitude=9",
            f"--model_dir={model_dir}",
        )
        with open(os.path.join(model_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["train_steps"], 3)
        self.assertBetween(summary["eval_top1"], 0.0, 1.0)


if __name__ == "__main__":
    tf.test.main()
