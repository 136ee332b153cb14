"""conadv.keras.split_batch_norm on keras.applications and hand-made models."""

import keras
import numpy as np
import tensorflow as tf

import conadv.keras as conadv_keras
from official.split_batch_norm import SplitBatchNormalization, batch_norm_mode

APPLICATIONS = ("ResNet50", "MobileNetV2", "EfficientNetB0")


def batch_norms(model, kind=keras.layers.BatchNormalization):
    return [layer for layer in model._flatten_layers() if isinstance(layer, kind)]


def randomise_batch_norms(model, seed=0):
    """Non-trivial γ, β and moving statistics: a copy that kept the initial values
    (1, 0, 0, 1) would no longer compute what the original computes."""
    rng = np.random.default_rng(seed)
    for layer in batch_norms(model):
        c = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))
        layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


class ApplicationsTest(tf.test.TestCase):
    def test_eval_outputs_equal_the_original_and_every_batch_norm_is_converted(self):
        """Catches: weights not copied (or one branch left at its initial values), Keras'
        momentum/epsilon replaced by the layer's defaults, a BatchNorm left unconverted."""
        x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
        for name in APPLICATIONS:
            original = getattr(keras.applications, name)(
                weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None
            )
            randomise_batch_norms(original)
            split = conadv_keras.split_batch_norm(original)
            self.assertEmpty(batch_norms(split), name)
            converted = batch_norms(split, SplitBatchNormalization)
            originals = batch_norms(original)
            self.assertLen(converted, len(originals), name)
            for old, new in zip(originals, converted):
                self.assertEqual((new.momentum, new.epsilon), (old.momentum, old.epsilon))
                for branch in ("main", "aux"):
                    self.assertAllEqual(
                        new.branch_variables(branch)["moving_variance"], old.moving_variance
                    )
            self.assertAllClose(
                split(x, training=False),
                original(x, training=False),
                atol=1e-5,
                rtol=1e-5,
                msg=name,
            )


class HandMadeModelTest(tf.test.TestCase):
    def nested(self):
        inner = keras.Sequential(
            [keras.Input((4, 4, 3)), keras.layers.Conv2D(5, 3), keras.layers.BatchNormalization()]
        )
        inputs = keras.Input((4, 4, 3))
        y = keras.layers.BatchNormalization(momentum=0.8)(inputs)
        y = inner(y)
        y = keras.layers.GlobalAveragePooling2D()(y)
        return keras.Model(inputs, keras.layers.Dense(2)(y))

    def test_nested_models_are_converted_and_the_mode_picks_the_branch(self):
        """Catches: nested models skipped, and a layer that ignores batch_norm_mode (the
        auxiliary call would then update the main branch)."""
        original = self.nested()
        randomise_batch_norms(original)
        split = conadv_keras.split_batch_norm(original)
        self.assertEmpty(batch_norms(split))
        layers = batch_norms(split, SplitBatchNormalization)
        self.assertLen(layers, 2)
        x = np.random.default_rng(2).normal(3, 2, (8, 4, 4, 3)).astype("float32")
        self.assertAllClose(split(x, training=False), original(x, training=False), atol=1e-5)
        main_before = [v.numpy() for v in layers[0].branch_variables("main").values()]
        aux_before = layers[0].branch_variables("aux")["moving_mean"].numpy()
        with batch_norm_mode("aux", update_stats=True):
            split(x, training=True)
        main_after = [v.numpy() for v in layers[0].branch_variables("main").values()]
        for a, b in zip(main_before, main_after):
            self.assertAllEqual(a, b)
        # The auxiliary moving mean moved toward the batch mean, by 1 − momentum (0.8).
        expected = 0.8 * aux_before + 0.2 * x.mean(axis=(0, 1, 2))
        self.assertAllClose(layers[0].branch_variables("aux")["moving_mean"], expected, atol=1e-5)

    def test_every_argument_of_a_batch_norm_is_carried_there_and_back(self):
        """Catches an argument dropped by the conversion or by the export: regularizers,
        constraints, center/scale, initializers, synchronized (group of all replicas),
        trainable."""
        inputs = keras.Input((4, 4, 3))
        first = keras.layers.BatchNormalization(
            momentum=0.7,
            epsilon=1e-2,
            center=False,
            gamma_initializer=keras.initializers.Constant(1.5),
            moving_variance_initializer=keras.initializers.Constant(2.0),
            gamma_regularizer=keras.regularizers.L2(0.3),
            gamma_constraint=keras.constraints.NonNeg(),
            synchronized=True,
            name="first",
        )
        second = keras.layers.BatchNormalization(
            scale=False,
            beta_regularizer=keras.regularizers.L1(0.2),
            beta_constraint=keras.constraints.MaxNorm(1.0, axis=0),
            name="second",
        )
        model = keras.Model(inputs, second(first(inputs)))
        second.trainable = False
        split = conadv_keras.split_batch_norm(model)
        plain = conadv_keras.plain_model(split)
        for layer in (first, second):
            want = layer.get_config()
            converted = split.get_layer(layer.name)
            got = converted.get_config()
            for key in got:
                if key in want and key != "build_config":
                    self.assertEqual(got[key], want[key], msg=f"{layer.name} {key}")
            self.assertEqual(converted.group_size, 0 if layer.synchronized else 1)
            self.assertEqual(plain.get_layer(layer.name).get_config(), want, msg=layer.name)
        self.assertFalse(split.get_layer("second").trainable)
        self.assertIsNone(split.get_layer("first").branch_variables("aux")["beta"])
        x = np.random.default_rng(3).normal(1, 2, (2, 4, 4, 3)).astype("float32")
        self.assertAllClose(split(x, training=False), model(x, training=False), atol=1e-6)
        self.assertAllClose(plain(x, training=False), model(x, training=False), atol=1e-6)

    def test_what_cannot_be_converted_is_refused_in_one_line(self):
        class Subclassed(keras.Model):
            def __init__(self):
                super().__init__()
                self.bn = keras.layers.BatchNormalization()

            def call(self, x):
                return self.bn(x)

        subclassed = Subclassed()
        subclassed(np.zeros((1, 4, 4, 3), "float32"))
        inputs = keras.Input((3, 4, 4))
        channels_first = keras.Model(inputs, keras.layers.BatchNormalization(axis=1)(inputs))
        for model, expected in ((subclassed, "functional"), (channels_first, "channels-last")):
            with self.assertRaises(conadv_keras.ConversionError) as raised:
                conadv_keras.split_batch_norm(model)
            self.assertIn(expected, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))
