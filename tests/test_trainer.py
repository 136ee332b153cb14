"""The training loop's pieces, each tested alone on a real ``Trainer`` (ResNet-8, synthetic data).

Catches: the loop giving the step a per-micro-batch divisor under gradient
accumulation (the update would be N times too large); precise BatchNorm
statistics taken on the augmented training stream instead of the training
images with the evaluation preprocessing.
"""

import tempfile

import numpy as np
import tensorflow as tf

from conadv.trainer import TrainConfig, Trainer
from input_pipeline.base import TRAIN, TRAIN_EVAL, DataSource
from official.precise_bn import PreciseBatchNorm
from tests import method_testing as mt

BATCH = 8


class DuplicatedHalves(DataSource):
    """Training batches of 8 whose last 4 images repeat the first 4, in order."""

    name = "duplicated_halves"

    def __init__(self):
        super().__init__(mt.IMAGE_SIZE, None, mt.NUM_CLASSES, 4 * BATCH, BATCH)
        images, labels = mt.fixed_batches(4, BATCH // 2, seed=31)
        self.images = np.concatenate([images, images], axis=1).reshape(-1, *images.shape[2:])
        self.labels = np.concatenate([labels, labels], axis=1).reshape(-1)

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        ds = tf.data.Dataset.from_tensor_slices((self.images, self.labels)).batch(batch_size)
        return ds.repeat().skip(start_step) if split == TRAIN else ds


class TrainerTest(tf.test.TestCase):
    def test_two_micro_batches_of_half_the_batch_update_as_one_batch(self):
        """Two accumulated micro-batches against one step on the whole batch, on batches whose
        halves are the same images: each micro-batch then has the whole batch's BatchNorm
        statistics, so the two must give the same weights. A loop that gave the step the
        micro-batch as its divisor would double the update."""
        weights = {}
        for n in (1, 2):
            directory = tempfile.mkdtemp(dir=self.get_temp_dir())
            config = TrainConfig(
                model_dir=directory,
                method="vanilla",
                model="resnet8",
                width_multiplier=0.25,
                global_batch_size=BATCH,
                accumulation_steps=n,
                train_steps=2,
                steps_per_loop=2,
                optimizer="momentum",
                learning_rate=0.1,
                warmup_epochs=0.0,
                seed=1,
            )
            trainer = Trainer(config, tf.distribute.get_strategy(), DuplicatedHalves())
            if n == 1:
                start = [v.numpy() for v in trainer.model.trainable_variables]
            trainer.train(evaluate=False)
            self.assertEqual(trainer.global_step, 2)
            weights[n] = [v.numpy() for v in trainer.model.trainable_variables]
            trainer.close()
        for one, two in zip(weights[1], weights[2]):
            self.assertAllClose(two, one, rtol=1e-4, atol=1e-5)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(weights[1], start))
        self.assertGreater(moved, 1e-2)  # a divisor off by 2 would show

    def test_precise_statistics_come_from_the_training_images_as_evaluated(self):
        directory = tempfile.mkdtemp(dir=self.get_temp_dir())
        trainer = mt.small_trainer(directory, method="vanilla", precise_bn_batches=1000)
        statistics = trainer.evaluator.precise_statistics()
        # One pass over the training images, not 1000 batches of the endless augmented stream.
        self.assertLess(statistics.batches, 1000)
        dataset = trainer.source.distribute(
            trainer.strategy,
            TRAIN_EVAL,
            trainer.micro_batch * trainer.strategy.num_replicas_in_sync,
        )
        want = PreciseBatchNorm(trainer.model, trainer.strategy).compute(dataset, 1000)
        self.assertEqual((statistics.batches, statistics.examples), (want.batches, want.examples))
        for got, expected in zip(
            statistics.means + statistics.variances, want.means + want.variances
        ):
            self.assertAllClose(got, expected, rtol=1e-5, atol=1e-6)
        trainer.close()


if __name__ == "__main__":
    tf.test.main()
