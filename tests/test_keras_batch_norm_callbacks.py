"""conadv.keras.PreciseBatchNorm and the warning ``fit`` gives when it ends with BatchNorm
moving statistics that still hold much of their initial values
(``conadv/keras_fit/batch_norm_callbacks.py``).

The callback is checked against ``ConAdvModel.precise_bn`` run on a copy of the
same weights, and its validations against ``evaluate`` after ``precise_bn``; the
warning's share against momentum**steps.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

import conadv.keras as conadv_keras

SHAPE = (6, 6, 3)
CLASSES = 3
BATCH = 8


def bn_net(momentum, seed=0, pretrained=False, frozen=False):
    """Conv → BatchNorm → ReLU → average pool → dense. The BatchNorm's moving statistics
    are Keras' initial ones (mean 0, variance 1) unless ``pretrained``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    bn = keras.layers.BatchNormalization(momentum=momentum, name="bn")
    x = keras.layers.ReLU()(bn(x))
    outputs = keras.layers.Dense(CLASSES, name="dense")(keras.layers.GlobalAveragePooling2D()(x))
    net = keras.Model(inputs, outputs, name="bn_net")
    if pretrained:
        rng = np.random.default_rng(seed + 1)
        bn.moving_mean.assign(rng.normal(0, 0.3, 4).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, 4).astype("float32"))
    bn.trainable = not frozen
    return net


def conadv_model(net, method="conadv"):
    model = conadv_keras.ConAdvModel(net, method=method, attack_eps=0.1, input_range=(0.0, 1.0))
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    return model


def examples(count, seed):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (count, *SHAPE)).astype("float32")
    # Channel-dependent offsets: statistics far from the initial 0 and 1.
    images = images * np.float32(2.0) + np.arange(3, dtype="float32")
    return images, rng.integers(0, CLASSES, count).astype("int32")


def batches(steps, seed=1):
    """``steps`` batches of BATCH examples, in one fixed order."""
    return tf.data.Dataset.from_tensor_slices(examples(steps * BATCH, seed)).batch(BATCH)


def main_statistics(model):
    bn = model.network.get_layer("bn")
    return bn.main_moving_mean.numpy(), bn.main_moving_variance.numpy()


def statistics_warnings(model, data, **kwargs):
    """The initial-statistics warnings of one ``model.fit(data, ...)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(data, verbose=0, **kwargs)
    return [w for w in caught if "initial values" in str(w.message)]


class PreciseBatchNormCallbackTest(tf.test.TestCase):
    def test_fit_ends_with_the_statistics_precise_bn_computes(self):
        """After ``fit`` the main branch holds what ``precise_bn(data, batches)`` computes
        for a copy of the weights training ended with (taken by a callback that ends before
        it), and the callback's ``statistics`` are those.

        Catches: statistics computed but not assigned (the moving averages stay); another
        number of batches or other data than given."""
        model = conadv_model(bn_net(0.99))

        class Snapshot(keras.callbacks.Callback):
            def on_train_end(self, logs=None):
                self.weights = self.model.get_weights()

        snapshot = Snapshot()
        callback = conadv_keras.PreciseBatchNorm(batches(3, seed=2), 2)
        model.fit(batches(3), verbose=0, callbacks=[snapshot, callback])
        reference = conadv_model(bn_net(0.99))
        reference.set_weights(snapshot.weights)
        moving = main_statistics(reference)
        expected = reference.precise_bn(batches(3, seed=2), 2)
        self.assertEqual((expected.batches, callback.statistics.batches), (2, 2))
        got = main_statistics(model)
        for value, want, old in zip(got, (expected.means[0], expected.variances[0]), moving):
            self.assertAllClose(value, want, rtol=1e-6, atol=1e-6)
            self.assertNotAllClose(value, old)
        self.assertAllEqual(callback.statistics.means[0], got[0])

    def validation(self, before_validation):
        """(History's val_loss and val_accuracy per epoch, those ``evaluate`` gives a copy
        of the weights at each epoch's end after ``precise_bn``)."""
        val = examples(16, seed=3)
        stats_data = batches(2, seed=4)
        reference = conadv_model(bn_net(0.99))
        expected = []

        class Expect(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                reference.set_weights(self.model.get_weights())
                reference.precise_bn(stats_data, 2)
                logs = reference.evaluate(*val, verbose=0, return_dict=True)
                expected.append([logs["loss"], logs["accuracy"]])

        model = conadv_model(bn_net(0.99))
        callback = conadv_keras.PreciseBatchNorm(stats_data, 2, before_validation)
        history = model.fit(
            batches(2), epochs=2, validation_data=val, verbose=0, callbacks=[callback, Expect()]
        )
        got = [history.history["val_loss"], history.history["val_accuracy"]]
        return np.transpose(got), np.array(expected)

    def test_before_validation_validates_with_precise_statistics(self):
        """With ``before_validation`` each epoch's val_loss and val_accuracy are what
        ``evaluate`` gives after ``precise_bn`` under that epoch's weights; without it they
        are the moving averages' (here far from them).

        Catches: the callback not recomputing before validation (no hook, or a hook that
        never runs); statistics recomputed after the validation instead of before."""
        got, expected = self.validation(before_validation=True)
        self.assertAllClose(got, expected, rtol=1e-5, atol=1e-6)
        got, expected = self.validation(before_validation=False)
        self.assertNotAllClose(got[:, 0], expected[:, 0], rtol=1e-2)

    def test_a_model_that_is_not_a_conadv_model_is_refused_in_one_line(self):
        """Catches: the callback silently doing nothing for a plain Keras model, or failing
        deep inside ``fit`` with an AttributeError."""
        net = bn_net(0.99)
        net.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        callback = conadv_keras.PreciseBatchNorm(batches(1), 1)
        with self.assertRaisesRegex(TypeError, "ConAdvModel") as caught:
            net.fit(*examples(BATCH, seed=5), verbose=0, callbacks=[callback])
        self.assertNotIn("\n", str(caught.exception))
        with self.assertRaisesRegex(TypeError, "tf.data.Dataset"):
            conadv_keras.PreciseBatchNorm(examples(BATCH, seed=5), 1)


class InitialStatisticsWarningTest(tf.test.TestCase):
    def test_a_short_fit_warns_once_with_the_share_of_initial_values(self):
        """3 steps at momentum 0.99: one warning, at the user's ``fit`` line, saying the
        moving statistics hold 0.99³ = 97 % of their initial values and naming both
        remedies. The same model says nothing again, not even after ``set_weights`` put
        its initial statistics back.

        Catches: momentum instead of momentum**n (99 %); a step too few or too many
        counted; the warning given at every ``fit`` that starts from initial statistics;
        a stacklevel inside Keras or ConAdv."""
        model = conadv_model(bn_net(0.99))
        initial_weights = model.get_weights()
        caught = statistics_warnings(model, batches(3))
        self.assertLen(caught, 1)
        message = str(caught[0].message)
        self.assertIn("hold 97 % of their initial values after 3 steps at momentum 0.99", message)
        self.assertIn("model.precise_bn(dataset, batches)", message)
        self.assertIn("conadv.keras.PreciseBatchNorm", message)
        self.assertEqual(caught[0].category, UserWarning)
        self.assertEqual(caught[0].filename, __file__)
        self.assertEqual(statistics_warnings(model, batches(3)), [])
        model.set_weights(initial_weights)
        self.assertEqual(statistics_warnings(model, batches(3)), [])

    def test_a_fit_long_enough_for_its_momentum_does_not_warn(self):
        """7 steps at momentum 0.5 leave 0.5⁷ = 0.8 % of the initial values: no warning.

        Catches: momentum instead of momentum**n (50 %); one step too few counted
        (0.5⁶ = 1.6 %); the warning given whatever the share."""
        model = conadv_model(bn_net(0.5))
        self.assertEqual(statistics_warnings(model, batches(7)), [])

    def test_no_warning_after_precise_bn_or_with_the_callback(self):
        """Statistics set by ``precise_bn`` before ``fit``, or by the callback at its end,
        hold no initial values: a 3-step ``fit`` at momentum 0.99 says nothing.

        Catches: a warning that counts steps without looking at the statistics; one that
        runs before the callback, or does not know it ran."""
        model = conadv_model(bn_net(0.99))
        model.precise_bn(batches(2, seed=2), 2)
        self.assertEqual(statistics_warnings(model, batches(3)), [])
        model = conadv_model(bn_net(0.99))
        callback = conadv_keras.PreciseBatchNorm(batches(2, seed=2), 2)
        self.assertEqual(statistics_warnings(model, batches(3), callbacks=[callback]), [])

    def test_statistics_not_at_their_initial_values_or_frozen_get_no_warning(self):
        """A BatchNorm whose statistics are not its initializers' (a pretrained model), or
        one frozen at its initial values (it keeps them, as ``precise_bn`` does), gets no
        warning after a 3-step ``fit`` at momentum 0.99.

        Catches: every BatchNorm counted whatever its statistics hold; a frozen one
        counted."""
        for kwargs in ({"pretrained": True}, {"frozen": True}):
            model = conadv_model(bn_net(0.99, **kwargs))
            self.assertEqual(statistics_warnings(model, batches(3)), [], kwargs)


if __name__ == "__main__":
    tf.test.main()
