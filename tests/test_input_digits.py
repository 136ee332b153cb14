"""The embedded digits source's training subset (``--train_examples``).

Catches: a subset drawn without stratification (a class short by more than one
example), one drawn afresh per run (two sources differ), the evaluation split
cut too, the clean training images (``TRAIN_EVAL``, which precise BatchNorm and
sharpness read) left at the whole set, and a count that the stratified split
cannot honour reaching it as a bare traceback.
"""

import numpy as np
import tensorflow as tf

from input_pipeline.base import EVAL, TRAIN, TRAIN_EVAL, DataError, PipelineOptions
from input_pipeline.digits import DigitsSource

SIZE = 8


def subset(count):
    return DigitsSource.create(
        name="digits",
        image_size=SIZE,
        data_dir=None,
        num_classes=None,
        options=PipelineOptions(seed=1),
        train_examples=count,
    )


def labels_of(source, split):
    return np.concatenate([y.numpy() for _, y in source.dataset(split, 64)])


class TrainingSubsetTest(tf.test.TestCase):
    def test_a_seeded_stratified_subset_of_the_training_split(self):
        whole = DigitsSource(SIZE)
        full = labels_of(whole, TRAIN_EVAL)
        kept = subset(256)
        self.assertEqual(kept.num_train_examples, 256)
        labels = labels_of(kept, TRAIN_EVAL)
        self.assertLen(labels, 256)
        want = 256 * np.bincount(full, minlength=10) / len(full)
        self.assertLessEqual(np.abs(np.bincount(labels, minlength=10) - want).max(), 1.0)
        # The same images for every run, each one of the training set's.
        images = np.concatenate([x.numpy() for x, _ in kept.dataset(TRAIN_EVAL, 64)])
        again = np.concatenate([x.numpy() for x, _ in subset(256).dataset(TRAIN_EVAL, 64)])
        self.assertAllEqual(images, again)
        every = np.concatenate([x.numpy() for x, _ in whole.dataset(TRAIN_EVAL, 64)])
        rows = {row.tobytes() for row in every.reshape(len(every), -1)}
        self.assertTrue(all(row.tobytes() in rows for row in images.reshape(256, -1)))
        # The training stream holds the subset's examples; the evaluation split is whole.
        first = next(iter(kept.dataset(TRAIN, 256)))[1].numpy()
        self.assertAllEqual(np.sort(first), np.sort(labels))
        self.assertAllEqual(labels_of(kept, EVAL), labels_of(whole, EVAL))

    def test_counts_the_split_cannot_honour_are_one_line_errors(self):
        total = DigitsSource(SIZE).num_train_examples
        self.assertEqual(subset(total).num_train_examples, total)
        for count in (9, total - 5, total + 1):
            with self.assertRaises(DataError, msg=count) as caught:
                subset(count)
            self.assertIn(f"--train_examples={count}", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


if __name__ == "__main__":
    tf.test.main()
