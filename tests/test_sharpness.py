"""Sharpness of trained weights (conadv/studies/sharpness.py) against closed forms.

Catches: power iteration without normalisation (its estimate grows or shrinks
with ‖v‖); a Hessian-vector product that is not the Hessian's (against the
exact Hessian of a linear softmax model, and finite differences of gradients
through BatchNorm); the loss taken with BatchNorm in training mode (batch
statistics) instead of the evaluation statistics; the augmented training
stream instead of the clean training images; an ε-sharpness box, ascent or
formula other than Keskar et al.'s (against a separable quadratic's maximum);
a float16 run that cannot be measured (its loss-scaled optimizer restored into
the float32 one); a measurement with the moving averages instead of the run's
precise statistics, or on the augmented stream; an ascent step of half the
box's side instead of a quarter, or the last point's loss instead of the
largest met (against a NumPy ascent on a loss whose maximum is inside the
box); the top eigenvalue reported as ‖Hv‖, losing its sign (against the exact
Hessian of a model whose eigenvalue of largest magnitude is negative).
"""

import tempfile
import types

import keras
import numpy as np
import tensorflow as tf

import conadv.keras as conadv_keras
from conadv.studies import sharpness
from input_pipeline.base import TRAIN, TRAIN_EVAL, PipelineOptions
from input_pipeline.digits import DigitsSource
from official import losses
from official.split_batch_norm import call_model
from tests import method_testing as mt


class QuadraticLoss:
    """½·θᵀAθ + bᵀθ + c of one variable: Hessian A."""

    def __init__(self, a, theta, b, c=0.0):
        self.a, self.b = tf.constant(a, tf.float32), tf.constant(b, tf.float32)
        self.c = float(c)
        self.variables = [tf.Variable(theta, dtype=tf.float32)]

    def value_and_gradient(self):
        theta = self.variables[0]
        value = 0.5 * tf.tensordot(theta, tf.linalg.matvec(self.a, theta), 1)
        value += tf.tensordot(self.b, theta, 1) + self.c
        return float(value), [tf.linalg.matvec(self.a, theta) + self.b]

    def hessian_vector_product(self, vector):
        return [tf.linalg.matvec(self.a, vector[0])]


def dataset_of(images, labels, batch):
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
    return tf.distribute.get_strategy().experimental_distribute_dataset(ds)


def linear_softmax(features=5, classes=4, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    return keras.Model(inputs, keras.layers.Dense(classes, name="dense")(inputs))


def exact_hessian(model, x, y):
    """The Hessian of the mean CE of a linear softmax model w.r.t. (kernel, bias), in the
    order of their flattened values: Σ_i (diag p − ppᵀ) ⊗ [x; 1][x; 1]ᵀ / N."""
    kernel, bias = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    features, classes = kernel.shape
    hessian = np.zeros((features * classes + classes,) * 2)
    for xi in x.astype(np.float64):
        logits = xi @ kernel + bias
        p = np.exp(logits - logits.max())
        p /= p.sum()
        block = np.diag(p) - np.outer(p, p)
        # kernel[j, c] is index j·C + c; bias[c] is F·C + c.
        jacobian = np.zeros((classes, features * classes + classes))
        for c in range(classes):
            jacobian[c, c : features * classes : classes] = xi
            jacobian[c, features * classes + c] = 1.0
        hessian += jacobian.T @ block @ jacobian
    return hessian / len(x)


def flat(tensors):
    return np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in tensors])


def squared_weight_model(u, kernel, bias):
    """logits = u²·x·K + c: one input, a 1×1 kernel u applied twice, a dense head (K, c)."""
    inputs = keras.Input((1,))
    square = keras.layers.Dense(1, use_bias=False, name="square")
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(inputs, head(square(square(inputs))))
    square.kernel.assign([[u]])
    head.kernel.assign([kernel])
    head.bias.assign(bias)
    return model


def squared_weight_hessian(u, kernel, bias, x, y):
    """The Hessian of the mean CE of ``squared_weight_model`` w.r.t. (u, K₀, K₁, c₀, c₁), by
    hand: with z = u²xK + c, p = softmax(z) and r = p − onehot(y), each example adds
    Jᵀ(diag p − ppᵀ)J + Σ_k r_k ∇²z_k, where ∂z_k/∂u = 2uxK_k, ∂z_k/∂K_j = u²x·[k = j],
    ∂z_k/∂c_j = [k = j], ∂²z_k/∂u² = 2xK_k and ∂²z_k/∂u∂K_j = 2ux·[k = j]."""
    kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    hessian = np.zeros((5, 5))
    for xi, yi in zip(np.asarray(x, np.float64).reshape(-1), y):
        z = u * u * xi * kernel + bias
        p = np.exp(z - z.max())
        p /= p.sum()
        r = p - np.eye(2)[yi]
        jacobian = np.zeros((2, 5))
        for k in range(2):
            jacobian[k, 0] = 2 * u * xi * kernel[k]
            jacobian[k, 1 + k] = u * u * xi
            jacobian[k, 3 + k] = 1.0
        hessian += jacobian.T @ (np.diag(p) - np.outer(p, p)) @ jacobian
        for k in range(2):
            hessian[0, 0] += r[k] * 2 * xi * kernel[k]
            hessian[0, 1 + k] += r[k] * 2 * u * xi
            hessian[1 + k, 0] += r[k] * 2 * u * xi
    return hessian / len(y)


def sign_ascent(value, gradient, theta, epsilon, steps, step=0.5, keep="largest"):
    """The documented ε-sharpness in float64, written from its description: from z = 0,
    ``steps`` times z ← clip(z + step·ε(|θ| + 1)·sign ∇L(θ + z), ±ε(|θ| + 1)), and
    100·(L_max − L(θ))/(1 + L(θ)) with L_max the largest loss met (``keep="last"``: the
    last point's). ``step=0.5`` is a quarter of the box's side."""
    half_width = epsilon * (np.abs(theta) + 1.0)
    base = value(theta)
    best, offset, smallest_gradient = base, np.zeros_like(theta), np.inf
    for _ in range(steps):
        g = gradient(theta + offset)
        smallest_gradient = min(smallest_gradient, np.abs(g).min())
        offset = np.clip(offset + step * half_width * np.sign(g), -half_width, half_width)
        met = value(theta + offset)
        best = met if keep == "last" else max(best, met)
    return 100.0 * (best - base) / (1.0 + base), base, smallest_gradient


class PowerIterationTest(tf.test.TestCase):
    def test_top_eigenvalue_of_a_quadratic(self):
        rng = np.random.default_rng(0)
        q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
        eigenvalues = np.array([5.0, 2.0, 1.5, 1.0, 0.5, 0.3, 0.2, 0.1])
        a = q @ np.diag(eigenvalues) @ q.T
        loss = QuadraticLoss(a, rng.normal(size=8), rng.normal(size=8))
        value, iterations, converged = sharpness.top_eigenvalue(
            loss, iterations=300, tolerance=1e-9
        )
        self.assertTrue(converged)
        self.assertAllClose(value, np.linalg.eigvalsh(a).max(), rtol=1e-3)
        self.assertGreater(iterations, 2)

    def test_top_eigenvalue_of_a_linear_softmax_model(self):
        rng = np.random.default_rng(1)
        x = rng.normal(0, 1.5, (40, 5)).astype("float32")
        y = rng.integers(0, 4, 40).astype("int32")
        model = linear_softmax()
        loss = sharpness.TrainingLoss(
            model, tf.distribute.get_strategy(), dataset_of(x, y, 16), len(y)
        )
        hessian = exact_hessian(model, x, y)
        vector = [tf.constant(rng.normal(size=v.shape), tf.float32) for v in loss.variables]
        self.assertAllClose(
            flat(loss.hessian_vector_product(vector)), hessian @ flat(vector), atol=1e-5
        )
        value, _, converged = sharpness.top_eigenvalue(loss, iterations=500, tolerance=1e-9)
        self.assertTrue(converged)
        self.assertAllClose(value, np.linalg.eigvalsh(hessian).max(), rtol=1e-3)

    def test_a_dominant_negative_eigenvalue_keeps_its_sign(self):
        """The top eigenvalue is the one of largest magnitude (as sharpness.py documents),
        with its sign: vᵀHv. Catches the estimate taken as ‖Hv‖, which is |λ|.

        At u = 0.05 the model's Hessian (by hand) is indefinite, its eigenvalue of
        largest magnitude about −1.9, its largest about +0.5.
        """
        rng = np.random.default_rng(5)
        x = rng.uniform(0.5, 1.5, (12, 1)).astype("float32")
        y = np.array([0] * 10 + [1] * 2, "int32")
        u, kernel, bias = 0.05, [2.0, -2.0], [0.2, -0.1]
        model = squared_weight_model(u, kernel, bias)
        loss = sharpness.TrainingLoss(
            model, tf.distribute.get_strategy(), dataset_of(x, y, 5), len(y)
        )
        self.assertEqual([tuple(v.shape) for v in loss.variables], [(1, 1), (1, 2), (2,)])
        hessian = squared_weight_hessian(u, kernel, bias, x, y)
        vector = [tf.constant(rng.normal(size=v.shape), tf.float32) for v in loss.variables]
        self.assertAllClose(  # the hand Hessian is the loss's
            flat(loss.hessian_vector_product(vector)), hessian @ flat(vector), atol=1e-6
        )
        eigenvalues = np.linalg.eigh(hessian)[0]
        want = eigenvalues[np.argmax(np.abs(eigenvalues))]
        self.assertLess(want, -1.5)
        self.assertGreater(eigenvalues.max(), 0.4)  # indefinite: its largest is another
        value, _, converged = sharpness.top_eigenvalue(loss, iterations=200, tolerance=1e-7)
        self.assertTrue(converged)
        self.assertAllClose(value, want, rtol=1e-4)


def small_network():
    """Conv → BatchNorm → tanh (smooth, for finite differences) → pool → dense, split, with
    moving statistics far from any batch's (so training-mode BatchNorm gives another loss)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("tanh")(h))
    net = keras.Model(inputs, keras.layers.Dense(3, name="dense")(h))
    net.get_layer("bn").moving_mean.assign([0.5, -0.3, 0.2, 0.1])
    net.get_layer("bn").moving_variance.assign([2.0, 0.5, 1.5, 0.8])
    return conadv_keras.split_batch_norm(net)


class TrainingLossTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        rng = np.random.default_rng(2)
        cls.x = rng.uniform(0, 1, (24, 6, 6, 3)).astype("float32")
        cls.y = rng.integers(0, 3, 24).astype("int32")
        cls.model = small_network()
        cls.loss = sharpness.TrainingLoss(
            cls.model, tf.distribute.get_strategy(), dataset_of(cls.x, cls.y, 10), 24, 0.1
        )

    def test_the_loss_is_the_evaluated_main_branch_on_the_clean_images(self):
        logits = call_model(self.model, self.x, False, "main")
        want = losses.cross_entropy(self.y, logits, 0.1).numpy().mean()
        self.assertAllClose(self.loss.value_and_gradient()[0], want, rtol=1e-6)
        aux = {
            id(v)
            for v in self.model.get_layer("bn").branch_variables("aux").values()
            if v is not None
        }
        self.assertFalse(any(id(v) in aux for v in self.loss.variables))

    def test_hessian_vector_product_against_finite_differences_of_gradients(self):
        rng = np.random.default_rng(4)
        vector = [tf.constant(rng.normal(size=v.shape), tf.float32) for v in self.loss.variables]
        product = flat(self.loss.hessian_vector_product(vector))
        theta = [tf.convert_to_tensor(v) for v in self.loss.variables]
        h = 1e-2
        gradients = []
        for sign in (1.0, -1.0):
            for var, t, v in zip(self.loss.variables, theta, vector):
                var.assign(t + sign * h * v)
            gradients.append(flat(self.loss.value_and_gradient()[1]))
        for var, t in zip(self.loss.variables, theta):
            var.assign(t)
        difference = (gradients[0] - gradients[1]) / (2 * h)
        error = np.linalg.norm(product - difference) / np.linalg.norm(product)
        self.assertLess(error, 1e-2)


class EpsSharpnessTest(tf.test.TestCase):
    def test_a_separable_quadratic_against_its_maximum_over_the_box(self):
        """½·Σ a_i θ_i² (a_i > 0) is largest in the box at θ_i + sign(θ_i)·ε(|θ_i| + 1)."""
        a = np.array([3.0, 1.0, 0.5, 2.0])
        theta = np.array([0.7, -1.2, 0.05, -0.3])
        epsilon = 0.05
        loss = QuadraticLoss(np.diag(a), theta, np.zeros(4))
        got, base = sharpness.eps_sharpness(loss, epsilon, steps=5)
        corner = np.abs(theta) + epsilon * (np.abs(theta) + 1)
        best, value = 0.5 * np.sum(a * corner**2), 0.5 * np.sum(a * theta**2)
        self.assertAllClose(base, value, rtol=1e-6)
        self.assertAllClose(got, 100 * (best - value) / (1 + value), rtol=1e-5)
        self.assertAllClose(loss.variables[0], theta)  # the weights are put back

    def test_quarter_side_steps_and_the_largest_loss_met_against_a_numpy_ascent(self):
        """L = 1 − ½(θ − m)ᵀP(θ − m), P coupled and positive definite, its maximum m inside
        the box: the ascent overshoots m to the box's face and comes back, so the largest
        loss met is neither the corner's nor the last point's. Against ``sign_ascent``.
        Catches: a step of half the box's side (ε(|θ_i| + 1) instead of half that), and
        the last point's loss reported instead of the largest met.
        """
        p = np.array(
            [[4.0, 1.0, 0.0, 0.5], [1.0, 3.0, 0.5, 0.0], [0.0, 0.5, 2.0, 0.3], [0.5, 0.0, 0.3, 5.0]]
        )
        theta = np.array([0.7, -1.2, 0.05, -0.3])
        epsilon, steps = 0.1, 4
        m = theta + epsilon * (np.abs(theta) + 1.0) * np.array([0.6, -0.7, 0.55, -0.65])
        loss = QuadraticLoss(-p, theta, p @ m, 1.0 - 0.5 * m @ p @ m)

        def value(t):
            return 1.0 - 0.5 * (t - m) @ p @ (t - m)

        def gradient(t):
            return -p @ (t - m)

        want, base, smallest_gradient = sign_ascent(value, gradient, theta, epsilon, steps)
        self.assertGreater(smallest_gradient, 1e-2)  # every sign is clear in float32
        got, got_base = sharpness.eps_sharpness(loss, epsilon, steps)
        self.assertAllClose(got_base, base, rtol=1e-6)
        self.assertAllClose(got, want, rtol=1e-4)
        self.assertAllClose(loss.variables[0], theta)  # the weights are put back

        # The case tells the wrong implementations apart (by far more than the tolerance).
        half_side = sign_ascent(value, gradient, theta, epsilon, steps, step=1.0)[0]
        last = sign_ascent(value, gradient, theta, epsilon, steps, keep="last")[0]
        corner = theta + epsilon * (np.abs(theta) + 1.0) * np.sign(gradient(theta))
        for other in (half_side, last, 100.0 * (value(corner) - base) / (1.0 + base)):
            self.assertGreater(abs(other - want), 0.1 * want)


class CleanTrainingImagesTest(tf.test.TestCase):
    def test_the_first_training_images_as_evaluated_in_order(self):
        source = DigitsSource(16)
        strategy = tf.distribute.get_strategy()
        dataset, count = sharpness.clean_training_images(source, strategy, 100, 32)
        self.assertEqual(count, 100)
        got = np.concatenate([images.numpy() for images, _ in dataset])
        want = np.concatenate([i.numpy() for i, _ in source.dataset(TRAIN_EVAL, 50)])[:100]
        self.assertAllEqual(got, want)
        stream = next(iter(source.dataset(TRAIN, 100)))[0].numpy()
        self.assertGreater(np.abs(stream - got).max(), 0)  # the training stream differs


class MeasureRunTest(tf.test.TestCase):
    """``measure_run`` on a run trained in float16 and restored in float32: the trained
    weights and step, the run's precise statistics, the clean training images."""

    def test_a_float16_run_measured_in_float32_with_its_evaluation_statistics(self):
        from conadv.run.checkpoints import CheckpointMismatchError

        model_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        # Digits: distinct images (synthetic data repeats one batch).
        settings = dict(
            method="conadv",
            train_steps=2,
            checkpoint_steps=1,
            precise_bn_batches=2,
            source=DigitsSource(mt.IMAGE_SIZE, PipelineOptions(seed=5, deterministic=True)),
        )
        trained = mt.small_trainer(model_dir, precision="mixed_float16", **settings)
        trained.train(evaluate=False)
        with self.assertRaises(CheckpointMismatchError):  # why only the weights are read
            mt.small_trainer(model_dir, precision="float32", **settings).restore()
        measured = mt.small_trainer(model_dir, precision="float32", **settings)
        self.assertEqual(measured.restore(weights_only=True), 2)
        self.assertEqual(measured.global_step, 2)
        for got, want in zip(mt.snapshot(measured.model), mt.snapshot(trained.model)):
            self.assertAllEqual(got, want)
        flags = types.SimpleNamespace(
            sharpness_examples=24,
            sharpness_iterations=3,
            sharpness_tolerance=1e-3,
            sharpness_eps=1e-3,
            sharpness_steps=1,
        )
        result = sharpness.measure_run(measured, flags)
        self.assertEqual((result["global_step"], result["examples"]), (2, 24))
        self.assertEqual(result["bn_statistics"]["kind"], "precise")

        # The loss measured is the main branch's on the first 24 training images with
        # the evaluation preprocessing, under the precise statistics (not the moving
        # averages, not the augmented stream): an eager reference.
        def reference_loss(split):
            images, labels = next(iter(measured.source.dataset(split, 24)))
            logits = call_model(measured.model, images, False, "main")
            ce = losses.cross_entropy(labels, logits, measured.config.label_smoothing)
            return float(tf.reduce_mean(ce))

        with measured.evaluator.evaluation_statistics():
            want = reference_loss(TRAIN_EVAL)
            augmented = reference_loss(TRAIN)
        moving = reference_loss(TRAIN_EVAL)
        self.assertAllClose(result["loss"], want, rtol=1e-5)
        for other in (moving, augmented):  # the test can tell them apart
            self.assertGreater(abs(other - want), 1e-3 * abs(want))


if __name__ == "__main__":
    tf.test.main()
