"""A tiny tensorflow-datasets dataset prepared on disk without any download.

``tfds.builder("conadv_test_shapes", data_dir=...)`` then finds it from its
files alone (as a user's prepared ``imagenet2012`` would be found), so the
subprocess running ``main.py`` needs no import of this module.
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "conadv_test_shapes"
NUM_CLASSES = 3
SPLIT_SIZES = {"train": 14, "test": 7}


def labels(split):
    return [i % NUM_CLASSES for i in range(SPLIT_SIZES[split])]


class ConadvTestShapes(tfds.core.GeneratorBasedBuilder):
    """Random RGB images of several sizes, PNG-encoded by TFDS, labels i % 3."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        rng = np.random.default_rng(len(split))
        for i, label in enumerate(labels(split)):
            image = rng.integers(0, 256, (24 + 3 * i, 40 - i, 3), dtype=np.uint8)
            yield i, {"image": image, "label": label}


def prepare(data_dir):
    ConadvTestShapes(data_dir=data_dir).download_and_prepare()
