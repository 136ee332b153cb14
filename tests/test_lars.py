"""LARS and momentum SGD against an independent NumPy implementation of the MLPerf update."""

import numpy as np
import tensorflow as tf

from official import lars, momentum_sgd, optimizers
from tests.child_process import run_for_result


def numpy_lars_step(w, g, v, lr, momentum, wd, eta, eps, trust=True):
    if w.ndim <= 1:
        step = lr * g
    else:
        step = lr * (g + wd * w)
        if trust:
            wn, gn = np.linalg.norm(w), np.linalg.norm(g)
            ratio = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
            step = ratio * step
    v = momentum * v + step
    return w - v, v


def run_optimizer(opt, weights, grads_per_step):
    variables = [tf.Variable(w) for w in weights]
    opt.build(variables)
    for grads in grads_per_step:
        opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    return [v.numpy() for v in variables]


class LarsTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        shapes = [(3, 3, 4, 8), (8, 5), (5,), (8,)]  # conv kernel, dense kernel, bias, BN γ
        self.weights = [rng.normal(0, 0.5, s).astype(np.float32) for s in shapes]
        self.grads = [
            [rng.normal(0, 0.1 * (k + 1), s).astype(np.float32) for s in shapes] for k in range(3)
        ]

    def _numpy(self, lr, momentum, wd, eta, eps, trust):
        ws = [w.astype(np.float64) for w in self.weights]
        vs = [np.zeros_like(w) for w in ws]
        for grads in self.grads:
            for i, g in enumerate(grads):
                ws[i], vs[i] = numpy_lars_step(
                    ws[i], g.astype(np.float64), vs[i], lr, momentum, wd, eta, eps, trust
                )
        return ws

    def test_three_steps_match_numpy(self):
        got = run_optimizer(
            lars.LARS(2.0, momentum=0.9, weight_decay=5e-4, eta=0.001, epsilon=1e-9),
            self.weights,
            self.grads,
        )
        want = self._numpy(2.0, 0.9, 5e-4, 0.001, 1e-9, trust=True)
        for g, w, w0 in zip(got, want, self.weights):
            self.assertAllClose(g, w, rtol=1e-5, atol=1e-7)
            self.assertGreater(np.abs(g - w0).max(), 1e-5)  # the weights moved

    def test_momentum_sgd_three_steps_match_numpy(self):
        got = run_optimizer(
            momentum_sgd.MomentumSGD(0.1, momentum=0.9, weight_decay=1e-3), self.weights, self.grads
        )
        want = self._numpy(0.1, 0.9, 1e-3, 0.0, 0.0, trust=False)
        for g, w in zip(got, want):
            self.assertAllClose(g, w, rtol=1e-5, atol=1e-7)

    def test_with_schedule(self):
        schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay(
            [0], [1.0, 0.5]
        )  # step 0: 1.0, then 0.5
        opt = lars.LARS(schedule, momentum=0.0, eta=0.01)
        variables = [tf.Variable(self.weights[1])]
        opt.build(variables)
        for grads in self.grads[:2]:
            opt.apply_gradients([(tf.constant(grads[1]), variables[0])])
        w = self.weights[1].astype(np.float64)
        for lr, grads in zip((1.0, 0.5), self.grads[:2]):
            w, _ = numpy_lars_step(w, grads[1], 0.0, lr, 0.0, 0.0, 0.01, 0.0)
        self.assertAllClose(variables[0].numpy(), w, rtol=1e-5)

    def test_zero_norms_give_trust_one(self):
        zero, ones = tf.zeros([3, 3]), tf.ones([3, 3])
        self.assertEqual(float(lars.trust_ratio(zero, ones, 5e-4, 0.001)), 1.0)
        self.assertEqual(float(lars.trust_ratio(ones, zero, 5e-4, 0.001)), 1.0)
        self.assertEqual(float(lars.trust_ratio(zero, zero, 0.0, 0.001)), 1.0)
        self.assertAllClose(float(lars.trust_ratio(ones, ones, 0.0, 0.001)), 0.001)
        v = tf.Variable(tf.zeros([4, 4]))
        opt = lars.LARS(1.0, weight_decay=5e-4)
        opt.build([v])
        opt.apply_gradients([(tf.ones([4, 4]), v)])
        self.assertAllClose(v.numpy(), -np.ones((4, 4)))  # trust 1: a plain SGD step
        opt.apply_gradients([(tf.zeros([4, 4]), v)])
        self.assertTrue(np.all(np.isfinite(v.numpy())))

    def test_build_optimizer(self):
        self.assertIsInstance(optimizers.build_optimizer("lars", 1.0), lars.LARS)
        self.assertIsInstance(optimizers.build_optimizer("momentum", 1.0), momentum_sgd.MomentumSGD)
        with self.assertRaisesRegex(ValueError, "lars"):
            optimizers.build_optimizer("adam", 1.0)


MIRRORED_PROGRAM = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from official.lars import LARS
rng = np.random.default_rng(0)
w0 = rng.normal(0, 1, (4, 3)).astype("float32")
g = rng.normal(0, 1, (2, 4, 3)).astype("float32")  # one gradient per replica
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    v = tf.Variable(w0)
    opt = LARS(1.0, weight_decay=1e-3, eta=0.01)
    opt.build([v])
grads = strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.constant(g[ctx.replica_id_in_sync_group]) / 2.0)
@tf.function
def step(grads):
    strategy.run(lambda gr: opt.apply_gradients([(gr, v)]), args=(grads,))
step(grads)
print("RESULT " + json.dumps({"w": v.numpy().tolist(), "w0": w0.tolist(), "g": g.tolist()}))
"""


class LarsMirroredTest(tf.test.TestCase):
    def test_replica_step_equals_single_step_on_mean_gradient(self):
        r = run_for_result("-c", MIRRORED_PROGRAM)
        w0, g = np.array(r["w0"]), np.array(r["g"])
        want, _ = numpy_lars_step(w0, g.mean(axis=0), 0.0, 1.0, 0.9, 1e-3, 0.01, 0.0)
        self.assertAllClose(np.array(r["w"]), want, rtol=1e-5)


if __name__ == "__main__":
    tf.test.main()
