"""Split BatchNorm: branch isolation, update rules, export, synchronised moments."""

import functools
import json
import os

import keras
import numpy as np
import tensorflow as tf

from official import resnet
from official.group_moments import check_group_size, default_group_size
from official.model_conversion import plain_model
from official.split_batch_norm import SplitBatchNormalization, call_model, split_layers
from tests.child_process import run_for_result


def _layer(channels=4, **kwargs):
    layer = SplitBatchNormalization(**kwargs)
    layer.build((None, 3, 3, channels))
    return layer


def _values(layer):
    return {v.path: v.numpy().copy() for v in layer.weights}


class SplitBatchNormTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3, 3, 4)).astype(np.float32)

    def test_training_call_updates_only_that_branch_toward_batch_moments(self):
        layer = _layer()
        before = _values(layer)
        out = layer(self.x, training=True, bn_branch="main", update_stats=True).numpy()
        mean = self.x.mean(axis=(0, 1, 2))
        var = self.x.var(axis=(0, 1, 2))  # biased, as Keras
        self.assertAllClose(layer.main_moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
        self.assertAllClose(layer.main_moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
        for name in ("aux_moving_mean", "aux_moving_variance", "aux_gamma", "aux_beta"):
            var_ = getattr(layer, name)
            self.assertAllEqual(var_.numpy(), before[var_.path])
        # Output is normalised with the batch moments.
        self.assertAllClose(out, (self.x - mean) / np.sqrt(var + 1e-5), atol=1e-4)

    def test_aux_training_call_leaves_main_alone(self):
        layer = _layer()
        layer(self.x, training=True, bn_branch="aux", update_stats=True)
        self.assertAllClose(
            layer.aux_moving_mean.numpy(), 0.1 * self.x.mean(axis=(0, 1, 2)), rtol=1e-5
        )
        self.assertAllEqual(layer.main_moving_mean.numpy(), np.zeros(4))

    def test_updates_disabled_change_no_variable(self):
        layer = _layer()
        before = _values(layer)
        for branch in ("main", "aux"):
            layer(self.x, training=True, bn_branch=branch, update_stats=False)
            layer(self.x, training=False, bn_branch=branch)
        for v in layer.weights:
            self.assertAllEqual(v.numpy(), before[v.path])

    def test_bad_branch(self):
        with self.assertRaisesRegex(ValueError, "bn_branch"):
            _layer()(self.x, bn_branch="clean")


class MixedBranchTest(tf.test.TestCase):
    def test_mixed_call_equals_a_main_call_and_an_aux_call(self):
        rng = np.random.default_rng(4)
        clean = rng.normal(1.0, 2.0, (6, 3, 3, 4)).astype(np.float32)
        adv = rng.normal(-3.0, 0.5, (6, 3, 3, 4)).astype(np.float32)
        mixed, split = _layer(), _layer()
        for layer in (mixed, split):
            layer.aux_gamma.assign([2.0, 0.5, 1.0, 3.0])
            layer.aux_beta.assign([0.1, -0.1, 0.2, 0.0])
        both = mixed(np.concatenate([clean, adv]), training=True, bn_branch="mixed").numpy()
        main = split(clean, training=True, bn_branch="main").numpy()
        aux = split(adv, training=True, bn_branch="aux").numpy()
        self.assertAllClose(both, np.concatenate([main, aux]), atol=1e-5)
        for a, b in zip(mixed.weights, split.weights):
            self.assertAllClose(a.numpy(), b.numpy(), atol=1e-6)
        # Each branch moved toward its own half (the halves have very different means).
        self.assertAllClose(mixed.main_moving_mean.numpy(), 0.1 * clean.mean((0, 1, 2)), atol=1e-5)
        self.assertAllClose(mixed.aux_moving_mean.numpy(), 0.1 * adv.mean((0, 1, 2)), atol=1e-5)


class DefaultGroupSizeTest(tf.test.TestCase):
    def test_smallest_group_with_64_examples(self):
        cases = {
            (256, 1): 1,  # the default digits run
            (64, 512): 1,  # 32k on 512 TPU cores: per-core BatchNorm, as in the paper
            (48, 2048): 2,  # 96k on 2048 cores: pairs give 96 examples
            (16, 8): 4,  # 4 × 16 = 64
            (20, 8): 4,  # 3 replicas would do, but 3 does not divide 8
            (16, 6): 0,  # 4 needed, 6 is the only divisor ≥ 4: all replicas
            (2, 4): 0,  # even all replicas hold only 8 examples
        }
        for (per_replica, replicas), want in cases.items():
            size, reason = default_group_size(per_replica, replicas)
            self.assertEqual(size, want, (per_replica, replicas, reason))
            self.assertTrue(reason)

    def test_group_must_tile_the_replicas(self):
        self.assertEqual(check_group_size(2, 8), 2)
        self.assertEqual(check_group_size(0, 8), 0)
        with self.assertRaisesRegex(ValueError, "does not divide"):
            check_group_size(3, 8)


class ModelBranchTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = resnet.resnet("resnet20", 10, image_size=16, width_multiplier=0.5, seed=3)
        rng = np.random.default_rng(1)
        # Non-trivial main statistics and γ, so export and evaluation are tested for real.
        for layer in split_layers(cls.model):
            n = layer.main_gamma.shape[0]
            layer.main_gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.main_beta.assign(rng.normal(0, 0.1, n))
            layer.main_moving_mean.assign(rng.normal(0, 0.2, n))
            layer.main_moving_variance.assign(rng.uniform(0.5, 2.0, n))
        cls.x = rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)

    def test_model_training_call_touches_one_branch(self):
        before = {v.path: v.numpy() for v in self.model.variables}
        call_model(self.model, self.x, True, "aux", update_stats=False)
        for v in self.model.variables:
            self.assertAllEqual(v.numpy(), before[v.path])

    def test_auxiliary_variables_do_not_affect_evaluation(self):
        reference = self.model(self.x, training=False).numpy()
        saved = {v.path: v.numpy() for v in self.model.variables if "/aux_" in v.path}
        for v in self.model.variables:
            if "/aux_" in v.path:
                v.assign(np.abs(np.random.default_rng(2).normal(5, 3, v.shape)))
        changed = self.model(self.x, training=False).numpy()
        aux_eval = call_model(self.model, self.x, False, "aux").numpy()
        for v in self.model.variables:
            if v.path in saved:
                v.assign(saved[v.path])
        self.assertAllEqual(reference, changed)
        self.assertGreater(np.abs(aux_eval - reference).max(), 1e-3)

    def test_exported_plain_model_matches_evaluation(self):
        plain = plain_model(self.model)
        self.assertFalse(any(isinstance(layer, SplitBatchNormalization) for layer in plain.layers))
        expected = self.model(self.x, training=False).numpy()
        self.assertAllClose(plain(self.x).numpy(), expected, atol=1e-4)
        path = os.path.join(self.get_temp_dir(), "model.keras")
        plain.save(path)
        loaded = keras.models.load_model(path)  # no custom objects needed
        self.assertAllClose(loaded(self.x).numpy(), expected, atol=1e-4)


SYNC_PROGRAM = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from official.group_moments import check_group_size, default_group_size
from official.split_batch_norm import SplitBatchNormalization
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
# The two shards have very different means, so local and global moments differ.
x = np.concatenate([rng.normal(0, 1, (4, 2, 2, 3)), rng.normal(5, 2, (4, 2, 2, 3))])
x = x.astype("float32")
out = {}
for sync in (True, False):
    with strategy.scope():
        layer = SplitBatchNormalization(group_size=0 if sync else 1)
        layer.build((None, 2, 2, 3))
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    @tf.function
    def step(batch):
        return strategy.run(lambda b: layer(b, training=True, bn_branch="main"), args=(batch,))
    y = step(next(iter(ds)))
    out[str(sync)] = {
        "moving_mean": layer.main_moving_mean.numpy().tolist(),
        "output": np.concatenate(
            [t.numpy() for t in strategy.experimental_local_results(y)]).tolist(),
    }
"""


class SynchronizedTest(tf.test.TestCase):
    def test_synchronized_uses_global_batch_moments(self):
        result = two_replica_result()
        rng = np.random.default_rng(0)
        x = np.concatenate([rng.normal(0, 1, (4, 2, 2, 3)), rng.normal(5, 2, (4, 2, 2, 3))]).astype(
            "float32"
        )
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        synced = result["True"]
        self.assertAllClose(synced["moving_mean"], 0.1 * mean, rtol=1e-4)
        self.assertAllClose(synced["output"], (x - mean) / np.sqrt(var + 1e-5), atol=1e-4)
        # Unsynchronised replicas normalise with their own shard's moments instead.
        local = result["False"]
        self.assertGreater(
            np.abs(np.array(local["output"]) - np.array(synced["output"])).max(), 0.1
        )


#: Runs after SYNC_PROGRAM, in the same process (its ``strategy``, ``out``).
LARGE_MEAN_PROGRAM = """
from official import group_moments
from official import split_batch_norm as sbn
x = np.array(json.loads(INPUT), np.float32)  # [replica, part, 8, 4, 4, 3]
ds = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensors((x[:, 0].reshape(-1, 4, 4, 3), x[:, 1].reshape(-1, 4, 4, 3)))
)
with strategy.scope():
    layer = sbn.SplitBatchNormalization(group_size=2)
    layer.build((None, 4, 4, 3))

def replica(clean, adv):
    context = tf.distribute.get_replica_context()
    def all_reduce(t):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, t)
    replica_id = context.replica_id_in_sync_group
    return {
        "batch_moments": group_moments.batch_moments([clean, adv], 2),
        # The TPU paths' arithmetic, with an all-reduce in place of CrossReplicaSum.
        "table": group_moments._table_moments([clean, adv], all_reduce, replica_id, 2),
        "two_pass": group_moments._two_pass_moments([clean, adv], all_reduce),
        "layer": layer(tf.concat([clean, adv], 0), training=True, bn_branch="mixed"),
    }

@tf.function
def step(batch):
    return strategy.run(replica, args=batch)

out["large_mean"] = tf.nest.map_structure(
    lambda t: [v.numpy().tolist() for v in strategy.experimental_local_results(t)],
    step(next(iter(ds))),
)
"""


def large_mean_shards():
    """[replica, part, 8, 4, 4, 3] float32: |mean| up to 1000 per channel, σ = 0.1.

    The replicas' means differ by 0.2 (2σ), so the between-replica term of the
    group variance matters; the two parts (clean, adversarial) differ by 7.
    """
    rng = np.random.default_rng(5)
    means = np.array([1000.0, -500.0, 3.0])
    shards = [
        [rng.normal(means + 0.2 * r + 7.0 * p, 0.1, (8, 4, 4, 3)) for p in range(2)]
        for r in range(2)
    ]
    return np.array(shards, np.float32)


@functools.cache
def two_replica_result() -> dict:
    """Both programs in one child process (2 logical CPUs; a child costs seconds)."""
    program = (
        f"INPUT = {json.dumps(json.dumps(large_mean_shards().tolist()))}\n"
        + SYNC_PROGRAM
        + LARGE_MEAN_PROGRAM
        + 'print("RESULT " + json.dumps(out))\n'
    )
    return run_for_result("-c", program)


class LargeMeanGroupMomentsTest(tf.test.TestCase):
    """Group moments of 2 replicas when |mean| ≫ σ, against float64 NumPy.

    Catches the variance as E[x²] − E[x]² of float32 sums (the defect of issue
    15 item 8): at mean 1000 each float32 square x² ≈ 1e6 is rounded by ~6e-8 · 1e6,
    far more than σ² = 0.01; the old code's variance was off by 510 %.
    Also catches a combination that drops the between-replica term Σ n_i·(mean_i
    − mean)² (the replicas' means differ by 2σ).
    """

    # Measured: mean within 2.3e-5 (float32 rounds 1000 to 6.1e-5) and variance
    # within 2.6e-7 relative; the old code's variance was off by more than 100 %.
    MEAN_ATOL = 1e-4
    VARIANCE_RTOL = 1e-5

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x = large_mean_shards()
        cls.result = two_replica_result()["large_mean"]

    def _want(self, part):
        x = self.x[:, part].astype(np.float64)  # both replicas' shards: the group of 2
        return x.mean(axis=(0, 1, 2, 3)), x.var(axis=(0, 1, 2, 3))

    def test_batch_moments_and_the_tpu_arithmetic_match_numpy(self):
        for name in ("batch_moments", "table", "two_pass"):
            for replica in range(2):  # both members of the group get the group's moments
                for part in range(2):
                    mean, variance = self.result[name][part]
                    want_mean, want_variance = self._want(part)
                    msg = f"{name}, replica {replica}, part {part}"
                    self.assertAllClose(mean[replica], want_mean, atol=self.MEAN_ATOL, msg=msg)
                    self.assertAllClose(
                        variance[replica], want_variance, rtol=self.VARIANCE_RTOL, msg=msg
                    )

    def test_layer_normalises_with_the_group_moments(self):
        for replica in range(2):
            got = np.array(self.result["layer"][replica])
            want = []
            for part in range(2):
                mean, variance = self._want(part)
                want.append((self.x[replica, part] - mean) / np.sqrt(variance + 1e-5))
            # Measured 4e-4: tf.nn.batch_normalization computes x·s − mean·s with
            # x·s ≈ 7000. A 1 % variance error would move the outputs (up to ~4) by 2e-2.
            self.assertAllClose(got, np.concatenate(want), atol=2e-3)


if __name__ == "__main__":
    tf.test.main()
