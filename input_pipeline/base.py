"""The one interface every data source implements.

Training code never knows where images come from: it asks a ``DataSource``
for a per-replica ``tf.data.Dataset`` of ``(images, labels)`` batches, where
images are float32 pixels in [0, 255] of shape ``[B, image_size, image_size, 3]``
(normalisation is the model's first layer, so attack budgets stay in pixel
units) and labels are int32 ``[B]``. Batches always have a static shape
(``drop_remainder=True`` for training), which the compiled step and the
on-device ring buffer of ConAdv rely on.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json

import tensorflow as tf

from input_pipeline import augment
from input_pipeline.errors import DataError
from input_pipeline.selection import Selection

TRAIN = "train"
EVAL = "eval"
#: The training split read like the eval split (one pass, eval preprocessing,
#: possibly a fixed subset): the model's accuracy on it minus eval accuracy is
#: the generalization gap of the paper's Table 4.
TRAIN_EVAL = "train_eval"
#: The selection set (``--selection_examples``, ``input_pipeline/selection.py``): training
#: examples held out of TRAIN and TRAIN_EVAL, read like ``EVAL``; a study chooses its
#: learning rate on it, never on the evaluation split.
SELECTION = "selection"


#: Marks the message of a failed in-graph data check (see ``bad_record_message``).
BAD_RECORD = "bad record: "


def bad_record_message(problem, values, filename, index, fix):
    """A string tensor for ``tf.debugging.Assert`` naming the file and record.

    ``problem`` is a ``tf.strings.format`` template filled with ``values``.
    ``data_error_from`` finds the message again in the error the iterator raises.
    """
    template = BAD_RECORD + problem + " in file {} record {}; " + fix
    return tf.strings.format(template, [*values, filename, index])


def data_error_from(error: Exception) -> DataError | None:
    """The ``DataError`` inside a TensorFlow error raised by a failed data check."""
    text = str(error)
    start = text.find(BAD_RECORD)
    if start < 0:
        return None
    message = text[start + len(BAD_RECORD) :]
    for end in ("]", "\n", "\\n", "'"):  # the end of the Assert data, in any rendering
        message = message.split(end)[0]
    return DataError(message.replace('\\"', '"').strip())


@dataclasses.dataclass
class PipelineOptions:
    """Knobs shared by all sources; each source uses what applies to it."""

    seed: int | None = None
    deterministic: bool = False
    cache_eval: bool = False
    augment: str = "none"
    autoaugment_policy: str = "v0"
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0
    skip_corrupt_records: bool = False
    #: Decode each image inside a one-element dataset so that a failure can be
    #: named (file, record) or skipped. False decodes without it (faster, see
    #: ``input_pipeline.benchmark --nocheck_decode``); a corrupt image then
    #: stops the run with TensorFlow's own message.
    check_decode: bool = True
    tf_data_service: str | None = None
    #: 1: exact mode (one service worker); N > 1: fast mode; 0: the dispatcher's count.
    tf_data_service_workers: int = 1
    #: Seconds the tf.data service's dispatcher may leave a question unanswered.
    peer_timeout: float = 30.0
    #: The selection set held out of training (``input_pipeline/selection.py``): a count,
    #: a fraction below 1, or 0 for none; and which part.
    selection_examples: float = 0
    selection_seed: int = 0


class DataSource(abc.ABC):
    """A dataset split into train and eval, delivered as pixel batches."""

    #: Short name used by ``--dataset``.
    name: str = ""
    #: Image size used when ``--image_size`` is not given.
    default_image_size: int = 224
    #: Class names by label id, when the dataset has them (exported as labels.txt).
    class_names: list[str] | None = None
    #: (classes, training examples, evaluation examples) known without reading
    #: any file, for ``--mode=dry_run``; None where only the files can tell.
    nominal_sizes: tuple[int, int, int] | None = None
    #: Whether the source can hold a selection set out of its training examples (it has
    #: fixed examples with keys: ``input_pipeline/selection.py``).
    holds_out_selection: bool = False

    @classmethod
    def create(cls, *, name, image_size, data_dir, num_classes, options, **kwargs):
        """Builds the source from flag values; sources with more arguments override it."""
        del name, data_dir, num_classes
        return cls(image_size=image_size or cls.default_image_size, options=options, **kwargs)

    def __init__(
        self,
        image_size: int,
        options: PipelineOptions | None,
        num_classes: int,
        num_train_examples: int,
        num_eval_examples: int,
    ):
        self.image_size = int(image_size)
        self.options = options or PipelineOptions()
        #: The rule of the selection set, or None (``--selection_examples``).
        self.selection = Selection.from_flags(
            self.options.selection_examples, self.options.selection_seed
        )
        if self.selection is not None and not self.holds_out_selection:
            raise DataError(
                f"--selection_examples: --dataset={self.name} has no fixed training examples "
                "to hold out; use digits, folder, imagenet or tfds:NAME"
            )
        #: Number of label classes.
        self.num_classes = int(num_classes)
        #: Examples in one training epoch, and in the evaluation split.
        self.num_train_examples = int(num_train_examples)
        self.num_eval_examples = int(num_eval_examples)
        #: Training examples held out as the selection set (``SELECTION``), not counted in
        #: ``num_train_examples``; 0 without ``--selection_examples``.
        self.num_selection_examples = 0

    def content(self) -> dict:
        """What the data is, not where it lives: the description its fingerprint hashes.

        Two copies of the same data under other paths (another bucket, a moved
        folder) describe the same; other data (other files, other sizes, another
        version) does not. Sources that read files override it with what
        identifies the files' content without reading every image.
        """
        return {
            "dataset": self.name,
            "classes": self.num_classes,
            "train_examples": self.num_train_examples,
            "eval_examples": self.num_eval_examples,
        }

    def fingerprint(self) -> str:
        """A short hash of ``content()``: a run's data, whatever its path (run_config.json
        keeps it, and a resume on other data is refused; a sweep's run identity has it)."""
        text = json.dumps(self.content(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def augment_fn(self):
        """``--augment`` as ``fn(uint8 image, seed) -> uint8 image``, or None."""
        o = self.options
        return augment.policy_fn(
            o.augment, o.autoaugment_policy, o.randaugment_layers, o.randaugment_magnitude
        )

    @abc.abstractmethod
    def dataset(
        self,
        split: str,
        batch_size: int,
        input_context: tf.distribute.InputContext | None = None,
        start_step: int = 0,
    ) -> tf.data.Dataset:
        """Per-replica batches of ``(float32 [B,S,S,3] in [0,255], int32 [B])``.

        ``split`` is ``TRAIN`` (shuffled, augmented, repeated forever, static
        batch shape), ``EVAL`` (one pass in a fixed order, no augmentation, the
        last batch may be partial), ``TRAIN_EVAL`` (the training examples
        read like ``EVAL``; a source may use a fixed subset of them) or
        ``SELECTION`` (the held-out training examples read like ``EVAL``).
        ``batch_size`` is the per-replica batch. ``input_context`` shards the
        data across input pipelines when the strategy has more than one.
        ``start_step`` (``TRAIN`` only) makes the stream begin with the batches
        of that training step, as the stream begun at step 0 would deliver
        them (``input_pipeline/epochs.py``): a resumed run passes the number
        of steps' worth of batches it has already consumed.
        """

    def distribute(
        self,
        strategy: tf.distribute.Strategy,
        split: str,
        global_batch_size: int,
        start_step: int = 0,
        micro_batches: int = 1,
    ) -> tf.distribute.DistributedDataset:
        """The split as a distributed dataset of per-replica shards.

        ``micro_batches`` N > 1 (``TRAIN`` only, gradient accumulation): the
        elements are micro-batches of B/N, B being a replica's share of
        ``global_batch_size``, N per step; ``start_step`` still counts whole
        steps.
        """

        def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = input_context.get_per_replica_batch_size(global_batch_size)
            if split != TRAIN:
                return self.dataset(split, per_replica, input_context)
            # Micro-batches are the stream's batches: N of them per step.
            ds = self.dataset(
                split,
                per_replica // micro_batches,
                input_context,
                start_step=start_step * micro_batches,
            )
            # Training streams never end; saying so spares multi-worker
            # iterators an end-of-data all-reduce on every step.
            return ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))

        return strategy.distribute_datasets_from_function(dataset_fn)
