"""A diverged run stops at the step it diverged, naming it, and saves nothing poisoned."""

import os
import tempfile

import numpy as np
import tensorflow as tf

from conadv.nonfinite import NonFiniteError
from conadv.trainer import TrainConfig, Trainer
from input_pipeline.base import DataSource
from tests import method_testing as mt

BATCH = 8
POISONED_STEP = 5


class ArraySource(DataSource):
    """Fixed training batches, in order, from arrays the test makes (no shuffling)."""

    name = "arrays"

    def __init__(self, images, labels):
        super().__init__(mt.IMAGE_SIZE, None, mt.NUM_CLASSES, len(labels) * BATCH, BATCH)
        self.images, self.labels = images, labels

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        images = self.images.reshape(-1, mt.IMAGE_SIZE, mt.IMAGE_SIZE, 3)
        labels = self.labels.reshape(-1)
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        return ds.repeat().skip(start_step) if split == "train" else ds.take(1)


def poisoned_batches(num_batches):
    images, labels = mt.fixed_batches(num_batches, BATCH, seed=12)
    images[POISONED_STEP, 3, 7, 7, 1] = np.inf  # one pixel of one image of one batch
    return images, labels


class NonFiniteGuardTest(tf.test.TestCase):
    def _trainer(self, model_dir, method):
        images, labels = poisoned_batches(12)
        config = TrainConfig(
            model_dir=model_dir,
            method=method,
            model="resnet20",
            width_multiplier=0.25,
            global_batch_size=BATCH,
            eval_batch_size=BATCH,
            train_steps=8,
            steps_per_loop=4,
            checkpoint_steps=2,
            optimizer="momentum",
            learning_rate=0.05,
            warmup_epochs=0.0,
            seed=1,
        )
        return Trainer(config, tf.distribute.get_strategy(), ArraySource(images, labels))

    def test_poisoned_batch_stops_the_run_at_its_step(self):
        for method, quantity in (("vanilla", "clean loss"), ("conadv", "clean loss")):
            model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
            trainer = self._trainer(model_dir, method)
            with self.assertRaises(NonFiniteError) as caught:
                trainer.train(evaluate=False)
            message = str(caught.exception)
            # Batch k is trained at step k for both methods (ConAdv attacked it at
            # step k − τ, which changes no weight).
            self.assertEqual(
                message,
                f"non-finite {quantity} at step {POISONED_STEP}; last good checkpoint ckpt-4",
                method,
            )
            self.assertNotIn("\n", message)
            # Nothing after step 4 was saved, and what was saved is finite.
            latest = tf.train.latest_checkpoint(model_dir)
            self.assertEqual(os.path.basename(latest), "ckpt-4")
            fresh = self._trainer(model_dir, method)
            self.assertEqual(fresh.restore(), 4)
            for var in fresh.model.variables:
                self.assertTrue(np.all(np.isfinite(var.numpy())), var.path)

    def test_clean_data_trains_through(self):
        images, labels = mt.fixed_batches(12, BATCH, seed=12)  # same data, no Inf
        trainer = self._trainer(tempfile.mkdtemp(dir=self.get_temp_dir()), "vanilla")
        trainer.source = ArraySource(images, labels)
        trainer.train(evaluate=False)
        self.assertEqual(trainer.global_step, 8)


if __name__ == "__main__":
    tf.test.main()
