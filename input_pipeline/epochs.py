"""The training stream as numbered, seeded epochs, so that a run can start at any batch.

Each input pipeline's training stream is its epoch 0, 1, 2, … laid end to
end, and the order of epoch ``e`` depends only on ``--seed``, ``e`` and the
pipeline (the file order and the shuffle buffer are seeded from both). The
batch that step ``k`` reads therefore begins at a position of the stream
that arithmetic gives, and a resumed run starts there: it never produces the
epochs before, and the records of the current epoch before that position
are skipped before they are decoded. With ``--deterministic`` a resumed run
reads exactly the batches the uninterrupted run would have read, in the
same order; without it, parallel reads may reorder records within an epoch,
but no epoch is read twice.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

#: An upper bound on the number of epochs of a stream (it is never reached).
MAX_EPOCHS = 2**40


def epoch_seed(seed: int | None, epoch: tf.Tensor, salt: int = 0) -> tf.Tensor:
    """A stateless-op seed (int64 ``[2]``) for one shuffle of one epoch.

    ``salt`` separates the shuffles of one epoch (file order, records). The
    stateless ops take a seed tensor; tf.data's own ``shuffle`` does not
    accept one under every global seed, so epochs are permuted with
    ``permute_blocks`` rather than with a seeded shuffle buffer.
    """
    epoch = tf.cast(epoch, tf.int64)
    return tf.stack([tf.constant(seed or 0, tf.int64), epoch * 16 + salt])


def shuffled(values: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """``values`` (along the first axis) in the stateless random order drawn from ``seed``."""
    return tf.random.experimental.stateless_shuffle(values, seed)


def permute_blocks(dataset: tf.data.Dataset, block: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Each run of ``block`` consecutive elements in a random order drawn from ``seed``.

    The stateless counterpart of a shuffle buffer of ``block`` elements:
    one permutation per block (the block's number folded into the seed),
    so the order is a pure function of the seed and the input order.
    """

    def permute(number, components):
        size = tf.shape(tf.nest.flatten(components)[0])[0]
        order = shuffled(tf.range(size), tf.random.experimental.stateless_fold_in(seed, number))
        return tf.data.Dataset.from_tensor_slices(
            tf.nest.map_structure(lambda c: tf.gather(c, order), components)
        )

    return dataset.batch(block).enumerate().flat_map(permute)


def records_per_step(per_replica_batch: int, input_context) -> int:
    """Records one input pipeline delivers per training step.

    A pipeline feeds ``num_replicas_in_sync / num_input_pipelines`` replicas,
    each taking one per-replica batch per step.
    """
    if input_context is None:
        return per_replica_batch
    replicas_per_pipeline = input_context.num_replicas_in_sync // max(
        1, input_context.num_input_pipelines
    )
    return per_replica_batch * max(1, replicas_per_pipeline)


def epochs_from(
    epoch_fn: Callable[[tf.Tensor], tf.data.Dataset],
    examples_per_epoch: Callable[[], int],
    start_position: int,
) -> tf.data.Dataset:
    """Epochs ``epoch_fn(0), epoch_fn(1), …`` concatenated, from ``start_position`` on.

    ``epoch_fn(e)`` is one epoch of this pipeline's records (finite, in the
    epoch's seeded order, not yet decoded). ``examples_per_epoch()`` is its
    length; it is asked only when ``start_position > 0`` (it may have to
    count records). Returns ``(epoch, element)`` pairs.
    """
    first_epoch, offset = 0, 0
    if start_position > 0:
        size = int(examples_per_epoch())
        if size <= 0:
            raise ValueError("an epoch of this input pipeline has no records")
        first_epoch, offset = divmod(int(start_position), size)

    def tagged_epoch(epoch):
        return epoch_fn(epoch).map(lambda *element: (epoch, element))

    stream = tf.data.Dataset.range(first_epoch, MAX_EPOCHS).flat_map(tagged_epoch)
    # Infinite, as tf.distribute needs to know: a multi-worker iterator over a
    # stream of unknown length adds an end-of-data all-reduce to every step.
    infinite = tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
    return stream.skip(offset).apply(infinite)


def count_records(dataset: tf.data.Dataset) -> int:
    """The number of elements of a finite dataset (read once, nothing decoded)."""
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1).numpy())
