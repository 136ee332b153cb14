"""``--dataset=tfds:NAME`` on a TFDS dataset prepared locally by the test."""

import collections
import json
import os

import numpy as np
import tensorflow as tf

from input_pipeline import registry
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

    def source(self, **kwargs):
        options = PipelineOptions(seed=1)
        return registry.get_source(
            DATASET, image_size=32, data_dir=self.data_dir, options=options, **kwargs
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
