"""A diverged run stops at the step it diverged, naming it, and saves nothing poisoned."""

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from conadv.run.nonfinite import (
    DIVERGED_FILE,
    NonFiniteError,
    NonFiniteGuard,
    record_divergence,
)
from conadv.trainer import TrainConfig, Trainer
from input_pipeline.base import DataSource
from official.split_batch_norm import split_layers
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
            model="resnet8",
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
            # main.py's record of it (diverged.json): the step and the last good checkpoint.
            error = caught.exception
            self.assertEqual((error.step, error.quantity, error.last_good_step), (5, quantity, 4))
            record_divergence(model_dir, error)
            with open(os.path.join(model_dir, DIVERGED_FILE)) as f:
                self.assertEqual(
                    json.load(f),
                    {
                        "message": message,
                        "step": POISONED_STEP,
                        "quantity": quantity,
                        "last_good_checkpoint_step": 4,
                    },
                )
            # Nothing after step 4 was saved, and what was saved is finite.
            latest = tf.train.latest_checkpoint(model_dir)
            self.assertEqual(os.path.basename(latest), "ckpt-4")
            fresh = self._trainer(model_dir, method)
            self.assertEqual(fresh.restore(), 4)
            for var in fresh.model.variables:
                self.assertTrue(np.all(np.isfinite(var.numpy())), var.path)

    def test_nan_adversarial_alone_stops_the_run_naming_it(self):
        """Catches a guard that ignores the adversarial loss: NaN in the auxiliary
        BatchNorm's γ leaves the clean pass (main branch) finite but makes every
        adversarial loss NaN, from step 0. A guard blind to it would report the
        gradient (NaN through the adversarial term) instead. (ConAdv; DisAdv shares
        the guard call.)"""
        trainer = self._trainer(tempfile.mkdtemp(dir=self.get_temp_dir()), "conadv")
        trainer.source = ArraySource(*mt.fixed_batches(12, BATCH, seed=12))  # no Inf
        layer = split_layers(trainer.model)[-1]
        layer.aux_gamma.assign(np.full(layer.aux_gamma.shape, np.nan, np.float32))
        with self.assertRaises(NonFiniteError) as caught:
            trainer.train(evaluate=False)
        message = str(caught.exception)
        self.assertTrue(message.startswith("non-finite adversarial loss at step 0;"), message)

    def test_guard_records_a_nan_adversarial_loss_with_finite_rest(self):
        """Catches a guard that ignores the adversarial loss: a NaN (or Inf)
        adversarial loss with a finite clean loss and finite gradients is recorded,
        at its step, as "adversarial loss"; all-finite quantities are not."""
        strategy = tf.distribute.get_strategy()
        gradients = [tf.constant([[0.5, -1.0]]), tf.constant([2.0])]
        for bad in (np.nan, np.inf):
            guard = NonFiniteGuard(strategy)

            @tf.function
            def check(step, adversarial, guard=guard):
                strategy.run(
                    lambda: guard.check(step, tf.constant([1.0, 2.0]), adversarial, gradients)
                )

            check(tf.constant(2, tf.int64), tf.constant([0.3, 0.4]))
            self.assertIsNone(guard.first())
            check(tf.constant(3, tf.int64), tf.constant([0.3, bad], tf.float32))
            self.assertEqual(guard.first(), (3, "adversarial loss"))

    def test_clean_data_trains_through(self):
        images, labels = mt.fixed_batches(12, BATCH, seed=12)  # same data, no Inf
        trainer = self._trainer(tempfile.mkdtemp(dir=self.get_temp_dir()), "vanilla")
        trainer.source = ArraySource(images, labels)
        trainer.train(evaluate=False)
        self.assertEqual(trainer.global_step, 8)


if __name__ == "__main__":
    tf.test.main()
