"""The embedded digits source's training subset (``--train_examples``) and selection set
(``--selection_examples``).

The subset's tests catch: a subset drawn without stratification (a class short by more than one
example), one drawn afresh per run (two sources differ), the evaluation split
cut too, the clean training images (``TRAIN_EVAL``, which precise BatchNorm and
sharpness read) left at the whole set, and a count that the stratified split
cannot honour reaching it as a bare traceback. The selection set's tests are named in
``SelectionSetTest``.
"""

import numpy as np
import tensorflow as tf

from input_pipeline.base import EVAL, SELECTION, TRAIN, TRAIN_EVAL, DataError, PipelineOptions
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


def held_out(count, seed=1, selection_seed=0, train_examples=None):
    return DigitsSource.create(
        name="digits",
        image_size=SIZE,
        data_dir=None,
        num_classes=None,
        options=PipelineOptions(seed=seed, selection_examples=count, selection_seed=selection_seed),
        train_examples=train_examples,
    )


def ids_of(images) -> list[bytes]:
    """Each image's pixels: at the scans' own 8 px every training image is distinct
    (checked), so the pixels are the example's id."""
    return [row.tobytes() for row in np.asarray(images).reshape(len(images), -1)]


def split_ids(source, split) -> list[bytes]:
    return ids_of(np.concatenate([x.numpy() for x, _ in source.dataset(split, 64)]))


def stream_ids(source, steps, batch=64) -> list[bytes]:
    """The ids of ``steps`` training batches, as a run reads them."""
    batches = source.dataset(TRAIN, batch).take(steps)
    return [i for x, _ in batches for i in ids_of(x.numpy())]


class SelectionSetTest(tf.test.TestCase):
    """Catches: the selection set left in the training stream or in the clean training
    images (TRAIN_EVAL, which precise BatchNorm and train top-1 read); examples lost
    (neither trained on nor selected); a part drawn by the run's --seed or by position
    in a shuffled stream (it differs between runs); a part not stratified; the
    --selection_seed ignored; --train_examples drawn before the part is held out (the
    part changes with it); a fraction or a count the set cannot give taken silently."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        whole = DigitsSource(SIZE)
        cls.all_ids = split_ids(whole, TRAIN_EVAL)
        cls.all_labels = labels_of(whole, TRAIN_EVAL)
        assert len(set(cls.all_ids)) == len(cls.all_ids)  # the pixels are an id

    def test_no_run_trains_on_the_selection_set_and_no_example_is_lost(self):
        selections = []
        for seed in (1, 7):  # two runs: other initial weights and data order
            source = held_out(200, seed=seed)
            self.assertEqual(source.num_selection_examples, 200)
            self.assertEqual(source.num_train_examples, len(self.all_ids) - 200)
            selection = split_ids(source, SELECTION)
            trained = stream_ids(source, steps=2 * source.num_train_examples // 64 + 3)
            clean = split_ids(source, TRAIN_EVAL)
            self.assertLen(selection, 200)
            self.assertEmpty(set(selection) & set(trained))
            self.assertEmpty(set(selection) & set(clean))
            self.assertEqual(set(trained), set(clean))  # two epochs see every kept one
            self.assertEqual(set(clean) | set(selection), set(self.all_ids))
            selections.append(selection)
        self.assertEqual(selections[0], selections[1])
        self.assertAllEqual(labels_of(held_out(200), EVAL), labels_of(DigitsSource(SIZE), EVAL))

    def test_the_part_is_stratified_and_its_seed_draws_another(self):
        source = held_out(200)
        by_id = dict(zip(self.all_ids, self.all_labels))
        counts = np.bincount([by_id[i] for i in split_ids(source, SELECTION)], minlength=10)
        share = 200 * np.bincount(self.all_labels, minlength=10) / len(self.all_labels)
        self.assertEqual(counts.sum(), 200)
        self.assertLess(np.abs(counts - share).max(), 1.0)
        other = set(split_ids(held_out(200, selection_seed=1), SELECTION))
        self.assertLess(len(other & set(split_ids(source, SELECTION))), 100)

    def test_the_part_is_held_out_before_the_training_subset_is_drawn(self):
        both = held_out(200, train_examples=256)
        self.assertEqual(split_ids(both, SELECTION), split_ids(held_out(200), SELECTION))
        self.assertEqual(both.num_train_examples, 256)
        self.assertEmpty(set(split_ids(both, TRAIN_EVAL)) & set(split_ids(both, SELECTION)))

    def test_fractions_and_refusals(self):
        self.assertEqual(held_out(0.25).num_selection_examples, round(0.25 * len(self.all_ids)))
        for amount in (len(self.all_ids) // 2 + 1, 0.6):
            with self.assertRaises(DataError, msg=amount) as caught:
                held_out(amount)
            self.assertIn("--selection_examples", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        with self.assertRaises(ValueError):
            DigitsSource(SIZE).dataset(SELECTION, 64)


if __name__ == "__main__":
    tf.test.main()
