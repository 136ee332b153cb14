"""BatchNorm statistics over a group of replicas (the paper's per-worker BatchNorm, and groups).

Batch statistics are taken over a *group* of replicas (``group_size``): 1 is
each replica's own batch (the paper's per-worker BatchNorm), k is k
consecutive replicas, 0 is every replica. Each replica's (count, mean, M2)
rows travel in one collective per layer — an ``all_gather`` under the
Mirrored strategies, TPU's grouped ``CrossReplicaSum`` of a table of the
group's rows on TPU — and are combined with the parallel-variance formula,
so a large mean does not cancel the variance (``batch_moments``).
Moments are float32 whatever the compute dtype (bfloat16 and float16 sums
over a large batch lose too much).
"""

from __future__ import annotations

import math

import tensorflow as tf

ALL_REPLICAS = 0

#: The paper uses BatchNorm statistics over at least this many examples.
MIN_EXAMPLES_PER_STATISTIC = 64


def check_group_size(group_size: int, num_replicas: int) -> int:
    """A group size that tiles the replicas: 0 (all), or a divisor of ``num_replicas``."""
    if group_size < 0:
        raise ValueError(f"BatchNorm group size must be >= 0, got {group_size}")
    if group_size and num_replicas % group_size:
        raise ValueError(
            f"BatchNorm group size {group_size} does not divide the {num_replicas} replicas"
        )
    return group_size


def default_group_size(
    per_replica_batch: int, num_replicas: int, min_examples: int = MIN_EXAMPLES_PER_STATISTIC
) -> tuple[int, str]:
    """The smallest group whose statistics cover ``min_examples``, and why it was chosen.

    ``per_replica_batch`` counts the examples one branch normalises on one
    replica (the clean batch; the adversarial batch has the same size).
    """
    if per_replica_batch >= min_examples or num_replicas == 1:
        reason = (
            f"each replica's batch of {per_replica_batch} covers the {min_examples} examples "
            "a statistic needs"
            if per_replica_batch >= min_examples
            else f"one replica, batch {per_replica_batch}"
        )
        return 1, reason
    needed = math.ceil(min_examples / per_replica_batch)
    for size in range(needed, num_replicas + 1):
        if num_replicas % size == 0:
            if size == num_replicas:
                break
            return size, (
                f"{size} replicas × {per_replica_batch} = {size * per_replica_batch} examples "
                f"is the smallest group with at least {min_examples}"
            )
    return ALL_REPLICAS, (
        f"{num_replicas} replicas × {per_replica_batch} = {num_replicas * per_replica_batch} "
        f"examples: only all replicas together reach {min_examples}"
        if num_replicas * per_replica_batch >= min_examples
        else f"even all {num_replicas} replicas hold only "
        f"{num_replicas * per_replica_batch} examples (< {min_examples})"
    )


#: On TPU, the largest group whose per-replica rows travel in one collective.
#: A table of more rows costs more bytes than a second small collective costs
#: latency, so larger groups (all replicas of a pod) make two collectives.
MAX_TABLE_ROWS = 64


def _axes(x: tf.Tensor) -> list[int]:
    return list(range(len(x.shape) - 1))


def _count(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)


def _centred_sums(x: tf.Tensor, centre: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(Σ(x − c), Σ(x − c)²) per channel, for a centre ``c`` that carries no gradient.

    With ``c`` close to the mean both sums keep their precision; the mean is
    then ``c + Σ(x − c)/n`` and M2 is ``Σ(x − c)² − n·(mean − c)²``, whose
    gradients, through the first sum only, are exactly those of the mean and M2.
    """
    centred = x - tf.stop_gradient(centre)
    return tf.reduce_sum(centred, _axes(x)), tf.reduce_sum(tf.square(centred), _axes(x))


def _local_rows(parts: list[tf.Tensor]) -> tf.Tensor:
    """Per part, this replica's (n, c, mean − c, M2), shape [parts, 3C + 1].

    ``c`` is the float32 mean (no gradient) and ``mean − c`` its rounding
    error, so the pair holds the mean to far more than float32 precision and
    M2 = Σ(x − mean)² is centred: E[x²] − E[x]² in float32 would lose the
    variance once |mean| ≫ σ, and so would a between-replica term built from
    float32 means.
    """
    rows = []
    for x in parts:
        count = _count(x)
        n = tf.maximum(count, 1.0)  # an empty shard: zeros, not NaN
        centre = tf.stop_gradient(tf.reduce_sum(x, _axes(x)) / n)
        first, second = _centred_sums(x, centre)
        residual = first / n
        rows.append(tf.concat([count[None], centre, residual, second - count * residual**2], 0))
    return tf.stack(rows)


def _combine_rows(table: tf.Tensor) -> list[tuple]:
    """(mean, biased variance) per part from a group's rows [rows, parts, 3C + 1].

    The parallel-variance formula (Chan et al.): M2 = Σ M2_i + Σ n_i·(mean_i −
    mean)², with every mean taken relative to a float32 shift near them all
    (the differences of nearby float32 numbers are exact; empty rows weigh
    nothing). Every group member holds the same table, so they compute the
    same moments.
    """
    channels = (table.shape[-1] - 1) // 3
    count = table[..., :1]
    centres = table[..., 1 : channels + 1]
    residuals = table[..., channels + 1 : 2 * channels + 1]
    n = tf.maximum(tf.reduce_sum(count, 0), 1.0)
    shift = tf.stop_gradient(tf.reduce_sum(count * centres, 0) / n)
    offsets = (centres - shift) + residuals  # mean_i − shift
    offset = tf.reduce_sum(count * offsets, 0) / n
    m2 = tf.reduce_sum(table[..., 2 * channels + 1 :] + count * tf.square(offsets - offset), 0)
    return list(zip(tf.unstack(shift + offset), tf.unstack(m2 / n)))


def _table_moments(parts, group_sum, slot, size: int) -> list[tuple]:
    """One summing collective: each replica writes its rows at ``slot`` of a ``size``-row
    table (zeros elsewhere); ``group_sum`` adds the group's tables into its full table."""
    rows = _local_rows(parts)
    mine = tf.equal(tf.range(size), tf.cast(slot, tf.int32))[:, None, None]
    table = tf.where(mine, rows[None], tf.zeros_like(rows)[None])
    return _combine_rows(group_sum(table))


def _two_pass_moments(parts, group_sum) -> list[tuple]:
    """Two summing collectives of one row per part: counts and sums give the group's
    float32 mean ``c`` (no gradient), then sums centred on ``c`` the mean and M2."""
    sums = tf.stop_gradient(
        group_sum(
            tf.stack([tf.concat([_count(x)[None], tf.reduce_sum(x, _axes(x))], 0) for x in parts])
        )
    )
    n = tf.maximum(sums[:, :1], 1.0)
    centres = tf.unstack(sums[:, 1:] / n)
    centred = group_sum(tf.stack([tf.stack(_centred_sums(x, c)) for x, c in zip(parts, centres)]))
    moments = []
    for c, part_sums, count in zip(centres, tf.unstack(centred), tf.unstack(n)):
        first, second = tf.unstack(part_sums)
        residual = first / count
        moments.append((c + residual, tf.maximum(second / count - residual**2, 0.0)))
    return moments


def batch_moments(parts: list[tf.Tensor], group_size: int = 1) -> list[tuple]:
    """(mean, biased variance) over all but the channel axis, for each of ``parts``.

    Over the replica's own batch when ``group_size`` is 1 (or there is one
    replica); otherwise over its group's batches, weighted by their sizes
    (unequal shards count by their examples). Each replica centres its own
    sums on its own mean and the group's (count, mean, M2) rows are combined
    with the parallel-variance formula, so a mean far larger than the
    spread does not cancel the variance. The rows travel in one collective:
    an ``all_gather`` of every replica's rows under the Mirrored strategies,
    and on TPU a grouped ``CrossReplicaSum`` of a table of the group's rows
    (two one-row collectives for groups above ``MAX_TABLE_ROWS``).
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    if group_size == 1 or replicas == 1:
        return [tf.nn.moments(x, list(range(len(x.shape) - 1))) for x in parts]

    size = replicas if group_size == ALL_REPLICAS else min(group_size, replicas)
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
        if size == replicas:
            # Every replica: two all-reduces of one row per part, not a gather of
            # every replica's rows (large on a big cluster).
            return _two_pass_moments(
                parts, lambda t: context.all_reduce(tf.distribute.ReduceOp.SUM, t)
            )
        rows = _local_rows(parts)  # [parts, 3C + 1]
        gathered = context.all_gather(rows[None], axis=0)  # every replica's rows, in order
        groups = tf.reshape(gathered, [replicas // size, size, *rows.shape])
        group = tf.cast(context.replica_id_in_sync_group, tf.int32) // size
        return _combine_rows(tf.gather(groups, group))

    # TPU's own grouped all-reduce: each group sums only its members' tensors
    # (TPU's all_gather is a masked all-reduce of every replica's rows).
    assignment = tf.constant([list(range(g, g + size)) for g in range(0, replicas, size)], tf.int32)

    def group_sum(t):
        return tf.raw_ops.CrossReplicaSum(input=t, group_assignment=assignment)

    if size > MAX_TABLE_ROWS:
        return _two_pass_moments(parts, group_sum)
    slot = tf.cast(context.replica_id_in_sync_group, tf.int32) % size
    return _table_moments(parts, group_sum, slot, size)
