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
consecutive replicas, 0 is every replica. Each replica's (count, mean, M2)
rows travel in one collective per layer — an ``all_gather`` under the
Mirrored strategies, TPU's grouped ``CrossReplicaSum`` of a table of the
group's rows on TPU — and are combined with the parallel-variance formula,
so a large mean does not cancel the variance (``batch_moments``).
Moments, normalisation and moving statistics are float32 whatever the
compute dtype (bfloat16 and float16 sums over a large batch lose too much).
"""

from __future__ import annotations

import contextlib
import math
import threading

import keras
import tensorflow as tf

BRANCHES = ("main", "aux")
MIXED = "mixed"
ALL_REPLICAS = 0

#: The paper uses BatchNorm statistics over at least this many examples.
MIN_EXAMPLES_PER_STATISTIC = 64


class _ThreadStack(threading.local):
    """A stack per thread (MirroredStrategy traces each replica in a thread of its own)
    of what the contexts below make active while a forward pass is traced."""

    def __init__(self):
        self.items = []

    @contextlib.contextmanager
    def pushed(self, item):
        self.items.append(item)
        try:
            yield item
        finally:
            self.items.pop()

    def top(self, default=None):
        return self.items[-1] if self.items else default


#: The collectors of ``collect_main_statistics``.
_collecting = _ThreadStack()


class MainStatisticsCollector:
    """What ``collect_main_statistics`` gathers: ``sums[layer] = (Σ(x−K), Σ(x−K)², n)``."""

    def __init__(self, shifts: dict | None):
        self.shifts = shifts or {}
        self.sums: dict = {}

    def add(self, layer, x, moving_mean):
        """Adds one call's sums: a layer called several times collects every call."""
        shift = self.shifts.get(layer, moving_mean)
        sums = shifted_sums(x, shift)
        if layer in self.sums:
            sums = tuple(a + b for a, b in zip(self.sums[layer], sums))
        self.sums[layer] = sums


@contextlib.contextmanager
def collect_main_statistics(shifts: dict | None = None):
    """Collects, while a forward pass is traced, every main branch's input sums.

    Inside the context each training-mode call of a split BatchNorm records
    ``(Σ(x−K), Σ(x−K)², n)`` for its main-branch input ``x``, summed over all
    but the channel axis of this replica's batch (and over every call of a
    layer the model calls more than once), with ``K = shifts[layer]``
    (default: the branch's moving mean). ``K`` must be the same on every
    replica, so the sums add up across replicas, and close to the mean, so
    a large mean does not cancel the variance. Precise BatchNorm
    (``official/precise_bn.py``) turns these into population statistics; the
    context is a trace-time one, so the model's call signature, and every
    layer between, stays unchanged.
    """
    with _collecting.pushed(MainStatisticsCollector(shifts)) as collector:
        yield collector


#: The choices of ``batch_norm_mode``.
_modes = _ThreadStack()


class BatchNormMode:
    """What a split BatchNorm called without ``bn_branch``, ``update_stats`` or
    ``group_statistics`` uses for them (see ``batch_norm_mode``)."""

    def __init__(self, bn_branch: str = "main", update_stats: bool = True, group_statistics=True):
        self.bn_branch = check_branch(bn_branch)
        self.update_stats = bool(update_stats)
        self.group_statistics = bool(group_statistics)


@contextlib.contextmanager
def batch_norm_mode(bn_branch: str = "main", update_stats: bool = True, group_statistics=True):
    """Chooses, while a model is called or traced, the branch and the update rule of every
    split BatchNorm it calls without its own ``bn_branch`` / ``update_stats`` /
    ``group_statistics`` arguments.

    A functional Keras model calls its layers with the arguments recorded when
    it was built, so these choices cannot travel through its call; the layers
    read them from this context instead (explicit arguments still win). It is
    per thread, as MirroredStrategy traces each replica in a thread of its own:
    enter it inside the replica function.
    """
    with _modes.pushed(BatchNormMode(bn_branch, update_stats, group_statistics)) as mode:
        yield mode


def call_model(
    model, inputs, training, bn_branch: str = "main", update_stats=True, group_statistics=True
):
    """``model(inputs, training=training)`` inside ``batch_norm_mode(bn_branch, update_stats,
    group_statistics)``: how the steps, the attack and precise BatchNorm call any model, a
    ResNet of ``official/resnet.py`` or a converted functional one alike."""
    with batch_norm_mode(bn_branch, update_stats, group_statistics):
        return model(inputs, training=training)


def current_mode() -> BatchNormMode:
    """The innermost ``batch_norm_mode`` of this thread (main branch, updating, grouped)."""
    mode = _modes.top()
    return BatchNormMode() if mode is None else mode


def _active_collector() -> MainStatisticsCollector | None:
    return _collecting.top()


def shifted_sums(x: tf.Tensor, shift: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(Σ(x−K), Σ(x−K)², count) per channel over all but the last axis, in float32."""
    axes = list(range(len(x.shape) - 1))
    centered = tf.cast(x, tf.float32) - tf.cast(shift, tf.float32)
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    return tf.reduce_sum(centered, axes), tf.reduce_sum(tf.square(centered), axes), count


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


@keras.saving.register_keras_serializable(package="conadv")
class SplitBatchNormalization(keras.layers.Layer):
    """Channels-last BatchNorm with a main and an auxiliary branch.

    Call with ``training`` (batch statistics if true, the branch's moving
    statistics otherwise), ``bn_branch`` ("main", "aux" or "mixed"),
    ``update_stats`` (whether a training call may update the moving
    statistics: ``moving ← momentum·moving + (1 − momentum)·batch``, with the
    biased batch variance as Keras does) and ``group_statistics`` (False: the
    replica's own batch, whatever ``group_size``; the attack uses this). Left
    out (None), the last three come from the enclosing ``batch_norm_mode``;
    ``mask`` is accepted (a functional model passes it) and ignored.

    ``center``, ``scale``, the initializers and the constraints are those of
    ``keras.layers.BatchNormalization`` and apply to both branches. The γ and
    β regularizers are not attached to the variables (Keras would then add
    both branches' penalties to every loss): ``branch_regularization(branch)``
    gives one branch's, for the objective that uses that branch.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        group_size: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        if int(group_size) < 0:
            raise ValueError(f"BatchNorm group size must be >= 0, got {group_size}")
        self.group_size = int(group_size)

    def build(self, input_shape):
        # autocast=False: read in float32 even inside a mixed-precision model.
        channels = int(input_shape[-1])

        def weight(name, initializer, trainable=True, constraint=None):
            # Moving statistics: the mean over replicas when read in cross-replica context.
            aggregation = {} if trainable else {"aggregation": "mean"}
            return self.add_weight(
                name=name,
                shape=(channels,),
                initializer=initializer,
                trainable=trainable,
                constraint=constraint,
                dtype="float32",
                autocast=False,
                **aggregation,
            )

        for branch in BRANCHES:
            gamma = beta = None
            if self.scale:
                gamma = weight(
                    f"{branch}_gamma", self.gamma_initializer, True, self.gamma_constraint
                )
            if self.center:
                beta = weight(f"{branch}_beta", self.beta_initializer, True, self.beta_constraint)
            mean = weight(f"{branch}_moving_mean", self.moving_mean_initializer, False)
            variance = weight(f"{branch}_moving_variance", self.moving_variance_initializer, False)
            setattr(self, f"{branch}_gamma", gamma)
            setattr(self, f"{branch}_beta", beta)
            setattr(self, f"{branch}_moving_mean", mean)
            setattr(self, f"{branch}_moving_variance", variance)

    def branch_variables(self, bn_branch: str) -> dict:
        """``gamma``, ``beta`` (None without ``scale`` / ``center``), ``moving_mean`` and
        ``moving_variance`` of one branch."""
        check_branch(bn_branch, allow_mixed=False)
        return {
            key: getattr(self, f"{bn_branch}_{key}")
            for key in ("gamma", "beta", "moving_mean", "moving_variance")
        }

    def branch_regularization(self, bn_branch: str) -> list[tf.Tensor]:
        """The γ and β regularizers' penalties of one branch: none when the layer is frozen
        (Keras regularizes trainable weights only)."""
        if not self.trainable:
            return []
        params = self.branch_variables(bn_branch)
        return [
            regularizer(params[key])
            for key, regularizer in (
                ("gamma", self.gamma_regularizer),
                ("beta", self.beta_regularizer),
            )
            if regularizer is not None and params[key] is not None
        ]

    def call(
        self,
        inputs,
        training=None,
        mask=None,
        bn_branch=None,
        update_stats=None,
        group_statistics=None,
    ):
        # None: the enclosing batch_norm_mode's choice (a functional model replays
        # the arguments recorded when it was built, so they cannot carry it).
        mode = current_mode()
        bn_branch = mode.bn_branch if bn_branch is None else check_branch(bn_branch)
        update_stats = mode.update_stats if update_stats is None else update_stats
        if group_statistics is None:
            group_statistics = mode.group_statistics
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
        collector = _active_collector() if training else None
        outputs = []
        for index, (part, branch) in enumerate(zip(parts, branches)):
            params = self.branch_variables(branch)
            if collector is not None and branch == "main":
                collector.add(self, part, params["moving_mean"].value)
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
                    None if params["beta"] is None else params["beta"].value,
                    None if params["gamma"] is None else params["gamma"].value,
                    self.epsilon,
                )
            )
        y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            group_size=self.group_size,
        )
        for name in (
            "beta_initializer",
            "gamma_initializer",
            "moving_mean_initializer",
            "moving_variance_initializer",
            "beta_regularizer",
            "gamma_regularizer",
            "beta_constraint",
            "gamma_constraint",
        ):
            config[name] = serialize(getattr(self, name))
        return config
