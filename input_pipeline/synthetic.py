"""Random images for speed measurements: no decoding, no host work per step.

One batch of uniform random pixels and labels is made once and repeated, so
the input pipeline costs nothing and a benchmark measures the step alone.
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline.base import TRAIN, DataSource


class SyntheticSource(DataSource):
    """ImageNet-shaped random data (1000 classes, 224 px unless told otherwise)."""

    name = "synthetic"
    nominal_sizes = (1000, 1_281_167, 1_024)
    default_image_size = 224

    @classmethod
    def create(cls, *, name, image_size, data_dir, num_classes, options, **kwargs):
        return cls(
            image_size=image_size or cls.default_image_size,
            options=options,
            num_classes=num_classes or 1000,
            **kwargs,
        )

    def __init__(
        self,
        image_size,
        options=None,
        num_classes: int = 1000,
        num_train_examples: int = 1_281_167,
        num_eval_examples: int = 1_024,
    ):
        super().__init__(image_size, options, num_classes, num_train_examples, num_eval_examples)

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        del start_step  # every training batch is the same one
        seed = 0 if self.options.seed is None else self.options.seed
        if input_context is not None:
            seed += 7919 * input_context.input_pipeline_id
        shape = [batch_size, self.image_size, self.image_size, 3]
        images = tf.random.stateless_uniform(shape, [seed, 1], 0.0, 255.0)
        labels = tf.random.stateless_uniform(
            [batch_size], [seed, 2], 0, self.num_classes, dtype=tf.int32
        )
        batch = tf.data.Dataset.from_tensors((images, labels))
        if split == TRAIN:
            return batch.repeat()
        num_batches = max(1, self.num_eval_examples // batch_size)
        return batch.repeat(num_batches)
