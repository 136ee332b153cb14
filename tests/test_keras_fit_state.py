"""The state one ``ConAdvModel.fit`` trains with, across ``fit``s (issue 32).

The ring is made from the weights it is given (``set_weights`` refills it, as
``load_weights`` does), arrays are shuffled anew in every epoch and every
``fit``, and a ring refilled after training takes the attack seeds and slots
of the stream positions of the optimizer's step, as ``main.py``'s loop would.
"""

import os
import tempfile
import warnings

import keras
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.keras import split_batch_norm
from conadv.ring_buffer import RingBuffer
from tests import test_keras_fit as fit_helpers
from tests import test_keras_model as model_helpers


class SetWeightsTest(tf.test.TestCase):
    def test_set_weights_refills_the_ring_from_the_weights_set(self):
        """ConAdv, τ = 2: train an epoch, ``set_weights`` of another network, fit again on the
        same arrays (which alone would continue the ring). The reference is a fresh model that
        got the same weights and optimizer state by ``load_weights`` from a file: its first
        ``fit`` fills its ring from them.

        Catches: ``set_weights`` that does not refill the ring (the next fit trains on the
        previous weights' adversarial examples of the previous stream's batches)."""
        x, y = fit_helpers.data()
        model = fit_helpers.conadv(fit_helpers.net(), staleness=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the partial batch skipped
            fit_helpers.fit_arrays(model, x, y)
        self.assertEqual(int(model.optimizer.iterations), fit_helpers.FULL_BATCHES)
        other = fit_helpers.conadv(fit_helpers.net(seed=7), staleness=2)
        model.set_weights(other.get_weights())
        fit_helpers.assert_same_weights(self, model, other, 0.0)
        # The state the reference starts from: the weights set, the optimizer after the epoch.
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "set.weights.h5")
        model.save_weights(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, batch_size=fit_helpers.BATCH, shuffle=False, verbose=0)

        reference = fit_helpers.conadv(fit_helpers.net(seed=11), staleness=2)
        reference.compile(optimizer=fit_helpers.optimizer(), metrics=["accuracy"])
        reference.optimizer.build(reference.trainable_variables)
        reference.load_weights(path)
        self.assertEqual(int(reference.optimizer.iterations), fit_helpers.FULL_BATCHES)
        fit_helpers.assert_same_weights(self, reference, other, 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference.fit(x, y, batch_size=fit_helpers.BATCH, shuffle=False, verbose=0)
        self.assertEqual(int(model.optimizer.iterations), 2 * fit_helpers.FULL_BATCHES)
        self.assertEqual(int(reference.optimizer.iterations), 2 * fit_helpers.FULL_BATCHES)
        fit_helpers.assert_same_weights(self, model.network, reference.network)


class BatchRecorder(keras.layers.Layer):
    """Passes its input on; in training, keeps every batch it sees, as NumPy (through
    ``tf.py_function``, so inside the step's ``tf.function`` too)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches = []

    def _keep(self, images):
        self.batches.append(images.numpy())
        return True

    def call(self, inputs, training=None):
        if not training:
            return inputs
        kept = tf.py_function(self._keep, [inputs], tf.bool)
        with tf.control_dependencies([kept]):
            return tf.identity(inputs)


def recording_net():
    """Input → recorder → conv → BatchNorm → ReLU → pool → dense (logits)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(fit_helpers.SHAPE)
    h = BatchRecorder(name="recorder")(inputs)
    h = keras.layers.Conv2D(5, 3, padding="same", name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(fit_helpers.CLASSES, name="dense")(h))


class ShuffleTest(tf.test.TestCase):
    def test_every_epoch_of_every_fit_on_arrays_has_an_order_of_its_own(self):
        """Vanilla (no attack pass, no ring: the recorder sees exactly the batches trained on),
        43 examples in batches of 8: one fit of 2 epochs, then a fit of 1 epoch. Each epoch
        trains on 5 batches of 40 distinct examples (3 skipped), in an order of its own;
        Keras' fit on the recorded order gives the same weights (the recorder saw the
        training batches).

        Catches: every ``fit`` shuffling with the same seed (its first epoch repeating the
        previous fit's first epoch); one order for every epoch of a fit; arrays not
        shuffled; the partial batch trained."""
        x, y = fit_helpers.data()
        row_ids = {row.tobytes(): i for i, row in enumerate(x)}
        self.assertLen(row_ids, len(x))
        model = fit_helpers.vanilla(recording_net())
        model.compile(optimizer=fit_helpers.optimizer(), jit_compile=False)
        recorder = model.network.get_layer("recorder")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the partial batch skipped
            for epochs in (2, 1):
                model.fit(
                    x, y, batch_size=fit_helpers.BATCH, shuffle=True, epochs=epochs, verbose=0
                )
        steps = 3 * fit_helpers.FULL_BATCHES
        self.assertEqual(int(model.optimizer.iterations), steps)
        self.assertLen(recorder.batches, steps)
        batches = [[row_ids[row.tobytes()] for row in batch] for batch in recorder.batches]
        self.assertEqual({len(batch) for batch in batches}, {fit_helpers.BATCH})
        epochs = [
            sum(batches[start : start + fit_helpers.FULL_BATCHES], [])
            for start in range(0, steps, fit_helpers.FULL_BATCHES)
        ]
        trained = fit_helpers.FULL_BATCHES * fit_helpers.BATCH
        for epoch in epochs:
            self.assertLen(set(epoch), trained)  # 40 distinct examples: 3 skipped
            self.assertTrue(set(epoch) <= set(range(len(x))))
            self.assertNotEqual(epoch, list(range(trained)))  # shuffled
        first_fit_epoch_1, first_fit_epoch_2, second_fit = epochs
        self.assertNotEqual(first_fit_epoch_2, first_fit_epoch_1)
        self.assertNotEqual(second_fit, first_fit_epoch_1)
        self.assertNotEqual(second_fit, first_fit_epoch_2)

        # The recorded order is what trained: Keras' fit on it gives the same weights.
        order = sum(epochs, [])
        reference = recording_net()
        reference.compile(
            optimizer=fit_helpers.optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        stream = tf.data.Dataset.from_tensor_slices((x[order], y[order]))
        reference.fit(stream.batch(fit_helpers.BATCH), epochs=1, shuffle=False, verbose=0)
        fit_helpers.assert_same_weights(
            self, model.export_model(), reference, fit_helpers.TOLERANCE
        )


class RefillAfterTrainingTest(tf.test.TestCase):
    def test_a_ring_refilled_at_step_t_takes_the_stream_positions_from_t(self):
        """ConAdv, τ = 2: a fit of 3 steps, then a fit on other data (its ring refilled at
        step 3), against ``conadv/steps.py``'s prologue and step driven by hand as
        ``main.py``'s loop drives them: the prologue at indices 0, 1, three steps, the
        prologue of the other data's first two batches at indices 3, 4, three steps.

        Catches: a refill numbering its batches from 0 instead of the optimizer's step (the
        attack seeds of positions 0, 1 and, at an odd step, the slots swapped)."""
        km = model_helpers
        images, labels = km.make_batches()
        other_images, other_labels = km.make_batches(seed=8)
        tau = 2
        model = km.conadv_model(km.small_net(), "conadv", tau)
        model.fit(km.dataset_of(images, labels), epochs=1, verbose=0)
        self.assertEqual(int(model.optimizer.iterations), km.STEPS)
        model.fit(km.dataset_of(other_images, other_labels), epochs=1, verbose=0)
        self.assertEqual(int(model.optimizer.iterations), 2 * km.STEPS)

        net = split_batch_norm(km.small_net())
        optimizer = keras.optimizers.SGD(km.LR)
        optimizer.build(net.trainable_variables)
        ctx = steps_lib.StepContext(
            model=net,
            optimizer=optimizer,
            global_batch_size=km.BATCH,
            num_classes=km.CLASSES,
            label_smoothing=km.SMOOTHING,
            attack=attack_lib.AttackConfig(eps=km.EPS, input_min=0.0, input_max=1.0),
            ring=RingBuffer(tf.distribute.get_strategy(), tau, km.BATCH, km.SHAPE),
        )
        prologue = tf.function(steps_lib.build_conadv_prologue(ctx))
        step = tf.function(steps_lib.build_step("conadv", ctx))
        for stream_images, stream_labels in ((images, labels), (other_images, other_labels)):
            first = int(optimizer.iterations)
            for i in range(tau):
                batch = (stream_images[i], stream_labels[i])
                prologue(batch, tf.constant(first + i, tf.int64))
            for t in range(km.STEPS):
                step((stream_images[t], stream_labels[t]))
        self.assertEqual(int(optimizer.iterations), 2 * km.STEPS)
        for got, want in zip(model.network.weights, net.weights):
            self.assertAllClose(got, want, atol=1e-6, rtol=1e-6, msg=got.path)
