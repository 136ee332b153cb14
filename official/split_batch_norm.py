"""BatchNorm with two independent branches (AdvProp's split BatchNorm), in groups of replicas.

Clean and adversarial images have different statistics; mixing them in one
BatchNorm hurts clean accuracy (Xie et al., 2020). Each layer therefore
keeps a *main* branch (clean images; used for evaluation and export) and an
*auxiliary* branch (adversarial images), each with its own γ, β and moving
statistics. The caller picks the branch per call — or ``"mixed"``: the first
half of the batch through main and the second half through auxiliary, so
one pass over ``[clean; adversarial]`` replaces two passes of half the size —
and whether the moving statistics may update (the attack's forward pass uses
batch statistics but must leave every variable untouched).

Batch statistics are taken over a *group* of replicas (``group_size``): 1 is
each replica's own batch (the paper's per-worker BatchNorm), k is k
consecutive replicas, 0 is every replica. A group's sums travel in one
collective per layer: an all-reduce for all replicas, TPU's grouped
``CrossReplicaSum`` on TPU, and an ``all_gather`` (summing the group's rows)
under the Mirrored strategies.
Moments, normalisation and moving statistics are float32 whatever the
compute dtype (bfloat16 and float16 sums over a large batch lose too much).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

BRANCHES = ("main", "aux")
MIXED = "mixed"
ALL_REPLICAS = 0

#: The paper uses BatchNorm statistics over at least this many examples.
MIN_EXAMPLES_PER_STATISTIC = 64


def check_branch(bn_branch: str, allow_mixed: bool = True) -> str:
    allowed = BRANCHES + ((MIXED,) if allow_mixed else ())
    if bn_branch not in allowed:
        raise ValueError(f"bn_branch must be one of {', '.join(allowed)}, got {bn_branch!r}")
    return bn_branch


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


def batch_moments(parts: list[tf.Tensor], group_size: int = 1) -> list[tuple]:
    """(mean, biased variance) over all but the channel axis, for each of ``parts``.

    Over the replica's own batch when ``group_size`` is 1 (or there is one
    replica); otherwise the per-replica sums, sums of squares and counts of
    every part are exchanged in a single collective and those of the
    replica's group added up, so unequal shards are weighted by their size.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    if group_size == 1 or replicas == 1:
        return [tf.nn.moments(x, list(range(len(x.shape) - 1))) for x in parts]

    channels = parts[0].shape[-1]
    local = []
    for x in parts:
        axes = list(range(len(x.shape) - 1))
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
        local.append(
            tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], 0)
        )
    local = tf.stack(local)  # [parts, 2C + 1]
    if group_size == ALL_REPLICAS or group_size >= replicas:
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
    elif isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy):
        # TPU's own grouped all-reduce: each group sums only its rows (TPU's
        # all_gather is a masked all-reduce of every replica's rows).
        groups = [list(range(g, g + group_size)) for g in range(0, replicas, group_size)]
        total = tf.raw_ops.CrossReplicaSum(
            input=local, group_assignment=tf.constant(groups, tf.int32)
        )
    else:
        gathered = context.all_gather(local[None], axis=0)  # [replicas, parts, 2C + 1]
        groups = tf.reshape(gathered, [replicas // group_size, group_size, *local.shape])
        group = tf.cast(context.replica_id_in_sync_group, tf.int32) // group_size
        total = tf.reduce_sum(tf.gather(groups, group), axis=0)
    moments = []
    for row in tf.unstack(total):
        n = tf.maximum(row[-1], 1.0)
        mean = row[:channels] / n
        variance = tf.maximum(row[channels : 2 * channels] / n - tf.square(mean), 0.0)
        moments.append((mean, variance))
    return moments


class SplitBatchNormalization(keras.layers.Layer):
    """Channels-last BatchNorm with a main and an auxiliary branch.

    Call with ``training`` (batch statistics if true, the branch's moving
    statistics otherwise), ``bn_branch`` ("main", "aux" or "mixed"),
    ``update_stats`` (whether a training call may update the moving
    statistics: ``moving ← momentum·moving + (1 − momentum)·batch``, with the
    biased batch variance as Keras does) and ``group_statistics`` (False: the
    replica's own batch, whatever ``group_size``; the attack uses this).
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        gamma_initializer="ones",
        group_size: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        if int(group_size) < 0:
            raise ValueError(f"BatchNorm group size must be >= 0, got {group_size}")
        self.group_size = int(group_size)

    def build(self, input_shape):
        # autocast=False: read in float32 even inside a mixed-precision model.
        channels = int(input_shape[-1])
        for branch in BRANCHES:
            gamma = self.add_weight(
                name=f"{branch}_gamma",
                shape=(channels,),
                initializer=self.gamma_initializer,
                dtype="float32",
                autocast=False,
            )
            beta = self.add_weight(
                name=f"{branch}_beta",
                shape=(channels,),
                initializer="zeros",
                dtype="float32",
                autocast=False,
            )
            mean = self.add_weight(
                name=f"{branch}_moving_mean",
                shape=(channels,),
                initializer="zeros",
                trainable=False,
                aggregation="mean",
                dtype="float32",
                autocast=False,
            )
            variance = self.add_weight(
                name=f"{branch}_moving_variance",
                shape=(channels,),
                initializer="ones",
                trainable=False,
                aggregation="mean",
                dtype="float32",
                autocast=False,
            )
            setattr(self, f"{branch}_gamma", gamma)
            setattr(self, f"{branch}_beta", beta)
            setattr(self, f"{branch}_moving_mean", mean)
            setattr(self, f"{branch}_moving_variance", variance)

    def branch_variables(self, bn_branch: str) -> dict:
        check_branch(bn_branch, allow_mixed=False)
        return {
            key: getattr(self, f"{bn_branch}_{key}")
            for key in ("gamma", "beta", "moving_mean", "moving_variance")
        }

    def call(
        self, inputs, training=False, bn_branch="main", update_stats=True, group_statistics=True
    ):
        check_branch(bn_branch)
        # As keras.layers.BatchNormalization: a frozen layer (trainable=False)
        # normalises with its moving statistics and never updates them.
        if not self.trainable:
            training = False
        x = tf.cast(inputs, tf.float32)
        if bn_branch == MIXED:
            parts = tf.split(x, 2, axis=0)
            branches = BRANCHES
        else:
            parts, branches = [x], (bn_branch,)
        if training:
            group = self.group_size if group_statistics else 1
            moments = batch_moments(parts, group)
        outputs = []
        for index, (part, branch) in enumerate(zip(parts, branches)):
            params = self.branch_variables(branch)
            if training:
                mean, variance = moments[index]
                if update_stats:
                    decay = 1.0 - self.momentum
                    for var, value in (
                        (params["moving_mean"], mean),
                        (params["moving_variance"], variance),
                    ):
                        var.assign_sub((var - value) * decay)
            else:
                mean = params["moving_mean"].value
                variance = params["moving_variance"].value
            outputs.append(
                tf.nn.batch_normalization(
                    part,
                    mean,
                    variance,
                    params["beta"].value,
                    params["gamma"].value,
                    self.epsilon,
                )
            )
        y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            group_size=self.group_size,
        )
        return config
