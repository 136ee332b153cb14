"""A folder-source ConAdv run on 2 logical CPU devices, stopped and resumed; prints JSON.

The uninterrupted run trains ``STEPS`` steps; the interrupted one trains to
``STOP`` (its checkpoint), then a fresh ``Trainer`` on the same model_dir
resumes to ``STEPS``. Every per-replica batch the training stream delivers
is recorded (labels and a pixel checksum, in delivery order) by a map at the
end of the source's pipeline, so the test sees what each run actually read.
A separate process, because logical devices must be configured before
TensorFlow initialises its devices (tests/test_resume.py starts it).
"""

import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

from conadv import attack as attack_lib  # noqa: E402
from conadv.trainer import TrainConfig, Trainer  # noqa: E402
from input_pipeline.base import TRAIN, PipelineOptions  # noqa: E402
from input_pipeline.imagenet import FolderSource  # noqa: E402
from tests import folder_data  # noqa: E402

GLOBAL_BATCH = 8
STEPS, STOP = 7, 3
STALENESS = 1


class RecordingFolderSource(FolderSource):
    """A folder source that notes every training batch it delivers, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delivered = []

    def _note(self, images, labels):
        self.delivered.append(
            {"labels": labels.numpy().tolist(), "pixels": float(np.sum(images.numpy()))}
        )
        return labels

    def dataset(self, split, batch_size, input_context=None, start_step=0):
        if split != TRAIN:
            return super().dataset(split, batch_size, input_context)
        ds = super().dataset(split, batch_size, input_context, start_step=start_step)

        def note(images, labels):
            labels = tf.py_function(self._note, [images, labels], tf.int32)
            labels.set_shape([batch_size])
            return images, labels

        return ds.map(note)


def write_folder_dataset(root):
    """24 training images of 3 classes in 4 shards (PNG), converted as a user would."""
    return folder_data.write_folder_dataset(root, seed=4, size=36, shards=4)


def trainer(model_dir, data_dir, strategy, train_steps):
    source = RecordingFolderSource(
        data_dir, image_size=32, options=PipelineOptions(seed=11, deterministic=True)
    )
    config = TrainConfig(
        model_dir=model_dir,
        method="conadv",
        staleness=STALENESS,
        model="resnet8",
        width_multiplier=0.25,
        global_batch_size=GLOBAL_BATCH,
        eval_batch_size=GLOBAL_BATCH,
        train_steps=train_steps,
        steps_per_loop=STOP,
        checkpoint_steps=STOP,
        optimizer="momentum",
        learning_rate=0.1,
        warmup_epochs=0.0,
        # Constant here, whatever train_steps says: the stopped run (train_steps
        # = STOP) and the whole run then follow the same learning rates.
        lr_schedule="step",
        attack=attack_lib.AttackConfig(eps=8.0),
        update_pass="separate",
        seed=3,
    )
    return Trainer(config, strategy, source)


def weights(model):
    return [v.numpy() for v in model.variables]


def main():
    root = tempfile.mkdtemp()
    data_dir = write_folder_dataset(root)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    whole = trainer(os.path.join(root, "whole"), data_dir, strategy, STEPS)
    whole.train(evaluate=False)

    first = trainer(os.path.join(root, "split"), data_dir, strategy, STOP)
    first.train(evaluate=False)
    resumed = trainer(os.path.join(root, "split"), data_dir, strategy, STEPS)
    resumed.train(evaluate=False)

    diffs = [
        float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
        for a, b in zip(weights(whole.model), weights(resumed.model))
    ]
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "steps_per_epoch": whole.steps_per_epoch,
        "whole_steps": whole.global_step,
        "first_steps": first.global_step,
        "resumed_steps": resumed.global_step,
        "whole": whole.source.delivered,
        "first": first.source.delivered,
        "resumed": resumed.source.delivered,
        "max_rel_weight_diff": max(diffs),
        "resumed_vs_first_part_max_rel_diff": max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
            for a, b in zip(weights(first.model), weights(resumed.model))
        ),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
