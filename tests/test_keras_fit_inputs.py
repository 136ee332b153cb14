"""ConAdvModel against Keras' own ``fit`` on every input Keras' ``fit`` takes.

Vanilla ``ConAdvModel`` (``label_smoothing=0``) must train as Keras' ``fit``
trains the same model with ``SparseCategoricalCrossentropy(from_logits=True)``:
with ``sample_weight``, ``class_weight``, ``validation_split``, a
``keras.utils.PyDataset`` (two worker threads) and a generator, each with
``steps_per_execution`` 1 and 3 over epochs of 5 batches — the same weights,
History and batch logs. ConAdvModel is also given a partial batch, which it
skips, and Keras is not. The weighted metric (``weighted_metrics``) and the
unweighted one (``metrics``) are both logged, as Keras logs them.
"""

import itertools

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import conadv.keras as conadv_keras
from tests.test_keras_fit import (
    BATCH,
    EPOCHS,
    FULL_BATCHES,
    Recorder,
    assert_trains_as_keras,
    data,
    net,
    optimizer,
    vanilla,
)

FULL = FULL_BATCHES * BATCH  # 40 examples in 5 full batches
CLASS_WEIGHT = {0: 0.5, 1: 2.0, 3: 0.0}  # class 2 has none: weight 1


def weights_for(count, seed=4):
    weights = np.random.default_rng(seed).uniform(0.0, 2.5, count).astype("float32")
    weights[::7] = 0.0
    return weights


class Batches(keras.utils.PyDataset):
    """``(x, y, w)`` batches of arrays, read by Keras' workers."""

    def __init__(self, x, y, w, **kwargs):
        super().__init__(**kwargs)
        self.arrays = (x, y, w)
        self.epochs_ended = 0

    def on_epoch_end(self):
        self.epochs_ended += 1

    def __len__(self):
        return -(-len(self.arrays[0]) // BATCH)

    def __getitem__(self, index):
        return tuple(a[index * BATCH : (index + 1) * BATCH] for a in self.arrays)


def endless(x, y, w):
    """Batches of (x, y, w) in order, again and again (a last partial batch included)."""
    for start in itertools.cycle(range(0, len(x), BATCH)):
        yield x[start : start + BATCH], y[start : start + BATCH], w[start : start + BATCH]


def compile_for_reference(model, steps_per_execution, **kwargs):
    model.compile(
        optimizer=optimizer(),
        metrics=["accuracy"],
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="weighted_accuracy")],
        steps_per_execution=steps_per_execution,
        **kwargs,
    )


def fit_both(case, steps_per_execution):
    """ConAdvModel's and Keras' fit of the same network on the inputs ``case`` names:
    (ours, reference, our history, theirs, our recorder, Keras' recorder)."""
    x, y = data()  # 43 examples: 5 full batches and 3 left over
    w = weights_for(len(y))
    ours, reference = vanilla(net()), net()
    compile_for_reference(ours, steps_per_execution)
    compile_for_reference(
        reference,
        steps_per_execution,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fits = {
        # (our fit's arguments, Keras' fit's arguments)
        "sample_weight": (
            dict(x=x, y=y, sample_weight=w, batch_size=BATCH, shuffle=False),
            dict(x=x[:FULL], y=y[:FULL], sample_weight=w[:FULL], batch_size=BATCH, shuffle=False),
        ),
        "class_weight": (
            dict(x=x, y=y, class_weight=CLASS_WEIGHT, batch_size=BATCH, shuffle=False),
            dict(
                x=x[:FULL], y=y[:FULL], class_weight=CLASS_WEIGHT, batch_size=BATCH, shuffle=False
            ),
        ),
        "py_dataset": (
            dict(x=Batches(x, y, w, workers=2), shuffle=False),
            dict(x=Batches(x[:FULL], y[:FULL], w[:FULL], workers=2), shuffle=False),
        ),
        "generator": (
            dict(x=endless(x, y, w), steps_per_epoch=FULL_BATCHES),
            dict(x=endless(x[:FULL], y[:FULL], w[:FULL]), steps_per_epoch=FULL_BATCHES),
        ),
    }
    if case == "validation_split":  # 48 examples, the last sixth for validation: 40 to train on
        x, y = data(count=48, seed=6)
        split = dict(x=x, y=y, sample_weight=weights_for(48), validation_split=1 / 6)
        fits[case] = (dict(split, batch_size=BATCH, shuffle=False),) * 2
    arguments = fits[case]
    recorders = Recorder(), Recorder()
    runs = []
    for model, kwargs, recorder in zip((ours, reference), arguments, recorders):
        runs.append(model.fit(epochs=EPOCHS, verbose=0, callbacks=[recorder], **kwargs))
    return ours, reference, *runs, *recorders


class EveryKerasInputTest(tf.test.TestCase, parameterized.TestCase):
    """Catches: a weight left out of the loss (or applied to the logged loss only, or the
    loss divided by the sum of the weights), the weighted metric given no weights or
    the unweighted one given them, class weights mapped otherwise than Keras maps them
    (a class without a weight given 0, or the weight of the wrong class), the
    validation split taken from the front or after shuffling, a PyDataset's or a
    generator's batches read out of order or one dropped, steps_per_epoch read
    otherwise than Keras reads it, and a partial batch trained."""

    @parameterized.product(
        case=("sample_weight", "class_weight", "validation_split", "py_dataset", "generator"),
        steps_per_execution=(1, 3),
    )
    def test_trains_as_keras_fit(self, case, steps_per_execution):
        ours, reference, history, theirs, recorder, keras_recorder = fit_both(
            case, steps_per_execution
        )
        # Keras runs whole executions of an endless generator: 6 steps an epoch for 3.
        steps = int(reference.optimizer.iterations)
        self.assertEqual(steps, (6 if case == "generator" and steps_per_execution == 3 else 5) * 2)
        assert_trains_as_keras(self, ours, reference, history, theirs, recorder, keras_recorder)
        # The weights matter: the weighted and unweighted accuracies differ somewhere.
        logged = theirs.history
        self.assertNotAllClose(logged["accuracy"], logged["weighted_accuracy"])
        if case == "validation_split":
            self.assertIn("val_weighted_accuracy", history.history)

    def test_validation_split_takes_the_last_examples_before_shuffling(self):
        """With shuffle, the validation data is still the arrays' last sixth, weighted.
        Catches a split taken after shuffling (or from the front, or without weights)."""
        x, y = data(count=48, seed=6)
        w = weights_for(48)
        model = vanilla(net())
        compile_for_reference(model, 1)
        history = model.fit(
            x, y, sample_weight=w, validation_split=1 / 6, batch_size=BATCH, epochs=1, verbose=0
        )
        plain = model.export_model()
        compile_for_reference(
            plain, 1, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        want = plain.evaluate(x[40:], y[40:], sample_weight=w[40:], verbose=0, return_dict=True)
        for key in ("loss", "accuracy", "weighted_accuracy"):
            self.assertAllClose(history.history[f"val_{key}"][0], want[key], rtol=1e-5, msg=key)


if __name__ == "__main__":
    tf.test.main()


class ConAdvStreamsTest(tf.test.TestCase):
    """ConAdv (τ = 2, weighted) on a PyDataset and on a generator, against the same batches
    as a tf.data.Dataset.

    A re-readable input (dataset, PyDataset) fills the ring from a fresh pass over its
    first τ batches; a generator, read once, from its first τ batches, after which the
    epoch goes on with the next ones. So a generator of (b0, b1, b0, b1, b2) trains as
    the dataset (b0, b1, b2). Catches: a ring filled by reading the PyDataset through
    Keras' enqueuer that also serves training (batches out of order or lost), a
    generator's batches lost to the fill's read-ahead, the generator's fill taken from
    a second reading that does not exist, weights not carried by these inputs."""

    def test_a_py_dataset_and_a_generator_train_as_the_dataset(self):
        x, y = data(count=3 * BATCH, seed=12)
        w = weights_for(len(y), seed=13)
        models = {}
        for kind in ("dataset", "py_dataset", "generator"):
            model = conadv_keras.ConAdvModel(
                net(), staleness=2, attack_eps=0.1, input_range=(0.0, 1.0)
            )
            compile_for_reference(model, 1)
            if kind == "dataset":
                model.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(BATCH), verbose=0)
            elif kind == "py_dataset":
                batches = Batches(x, y, w, workers=2, use_multiprocessing=False)
                model.fit(batches, shuffle=False)
                self.assertEqual(batches.epochs_ended, 1)  # its epoch hook ran, as in Keras
            else:
                order = [0, 1, 0, 1, 2]
                stream = (tuple(a[i * BATCH : (i + 1) * BATCH] for a in (x, y, w)) for i in order)
                model.fit(stream, steps_per_epoch=3, verbose=0)
            self.assertEqual(int(model.optimizer.iterations), 3)
            models[kind] = model
        for kind in ("py_dataset", "generator"):
            got, want = models[kind].network.get_weights(), models["dataset"].network.get_weights()
            for a, b in zip(got, want):
                self.assertAllClose(a, b, atol=1e-6, rtol=1e-6, msg=kind)


class UniformWeightsTest(tf.test.TestCase):
    """Weights of 2 on every example double the objective's gradient, which SGD turns
    into the same steps as twice the learning rate (the attack's sign unchanged): for
    DisAdv and ConAdv with either attack source. Catches the free attack's adversarial
    term (or its prologue's ring) left unweighted, or the weights entering the attack's
    own loss scaled in a way that changes its step."""

    def test_weights_of_two_train_as_twice_the_learning_rate(self):
        x, y = data(count=3 * BATCH, seed=14)
        for method, source in (
            ("conadv", "clean_pass"),
            ("disadv", "clean_pass"),
            ("conadv", "separate"),
        ):
            runs = []
            for rate, weights in ((0.1, 2.0), (0.2, None)):
                model = conadv_keras.ConAdvModel(
                    net(regularized=False),
                    method=method,
                    staleness=1,
                    attack_eps=0.1,
                    attack_random_init=source == "separate",
                    input_range=(0.0, 1.0),
                    attack_source=source,
                )
                model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9))
                arrays = (x, y) if weights is None else (x, y, np.full(len(y), weights))
                model.fit(tf.data.Dataset.from_tensor_slices(arrays).batch(BATCH), verbose=0)
                runs.append(model.network.get_weights())
            for a, b in zip(*runs):
                self.assertAllClose(a, b, atol=1e-6, rtol=1e-6, msg=f"{method} {source}")


class ClassWeightOnADatasetTest(tf.test.TestCase):
    def test_a_dataset_with_class_weight_trains_as_the_arrays(self):
        """The dataset's class weights (mapped in the pipeline) against the arrays' (checked
        against Keras' fit above), with labels of shape (N, 1) and a class without a
        weight. Catches a class without a weight given 0, or the labels' classes misread."""
        x, y = data()
        column = y[:, None]  # class ids of shape (N, 1)
        runs = []
        for as_dataset in (False, True):
            model = vanilla(net())
            compile_for_reference(model, 1)
            if as_dataset:
                batches = tf.data.Dataset.from_tensor_slices((x[:FULL], column[:FULL]))
                model.fit(batches.batch(BATCH), class_weight=CLASS_WEIGHT, verbose=0)
            else:
                model.fit(x[:FULL], column[:FULL], BATCH, class_weight=CLASS_WEIGHT, shuffle=False)
            runs.append(model.network.get_weights())
        for a, b in zip(*runs):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)
