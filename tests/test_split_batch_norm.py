"""Split BatchNorm: branch isolation, update rules, export, synchronised moments."""

import os

import keras
import numpy as np
import tensorflow as tf

from official import resnet
from official.split_batch_norm import (
    SplitBatchNormalization,
    check_group_size,
    default_group_size,
)
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
        for layer in cls.model.split_batch_norm_layers():
            n = layer.main_gamma.shape[0]
            layer.main_gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.main_beta.assign(rng.normal(0, 0.1, n))
            layer.main_moving_mean.assign(rng.normal(0, 0.2, n))
            layer.main_moving_variance.assign(rng.uniform(0.5, 2.0, n))
        cls.x = rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)

    def test_model_training_call_touches_one_branch(self):
        before = {v.path: v.numpy() for v in self.model.variables}
        self.model(self.x, training=True, bn_branch="aux", update_stats=False)
        for v in self.model.variables:
            self.assertAllEqual(v.numpy(), before[v.path])

    def test_auxiliary_variables_do_not_affect_evaluation(self):
        reference = self.model(self.x, training=False).numpy()
        saved = {v.path: v.numpy() for v in self.model.variables if "/aux_" in v.path}
        for v in self.model.variables:
            if "/aux_" in v.path:
                v.assign(np.abs(np.random.default_rng(2).normal(5, 3, v.shape)))
        changed = self.model(self.x, training=False).numpy()
        aux_eval = self.model(self.x, training=False, bn_branch="aux").numpy()
        for v in self.model.variables:
            if v.path in saved:
                v.assign(saved[v.path])
        self.assertAllEqual(reference, changed)
        self.assertGreater(np.abs(aux_eval - reference).max(), 1e-3)

    def test_exported_plain_model_matches_evaluation(self):
        plain = resnet.plain_inference_model(self.model)
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
from official.split_batch_norm import (
    SplitBatchNormalization,
    check_group_size,
    default_group_size,
)
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
print("RESULT " + json.dumps(out))
"""


class SynchronizedTest(tf.test.TestCase):
    def test_synchronized_uses_global_batch_moments(self):
        result = run_for_result("-c", SYNC_PROGRAM)
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


if __name__ == "__main__":
    tf.test.main()
