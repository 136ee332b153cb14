"""conadv.keras.ConAdvModel: fit against an eager reference and main.py's step functions,
export, models without BatchNorm, refusals and BackupAndRestore.

The reference is written here from the paper, not from conadv/steps.py: its own
convolution, BatchNorm with two branches, label-smoothed cross-entropy and
one-step PGD, and a history of weights from which it attacks stream position
p with θ_{p−τ}. Only the random start's noise comes from the project's
generator (``attack.stateless_uniform``), drawn with the seed the paper's
implementation gives position p.
"""

import glob
import json
import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

import conadv.keras as conadv_keras
from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.ring_buffer import RingBuffer
from official.split_batch_norm import SplitBatchNormalization, call_model

SHAPE = (6, 6, 3)
CLASSES = 3
BATCH = 8
STEPS = 3
LR = 0.5
EPS = 0.2  # in input units: the inputs are in [0, 1]
INPUT_RANGE = (0.0, 1.0)
SMOOTHING = 0.1
MOMENTUM, BN_EPSILON = 0.8, 1e-3
TOLERANCE = 1e-5


def small_net(with_bn=True, seed=0, name="small", l2=0.0, activity=True):
    """Conv → BatchNorm → ReLU → average pool → dense, with non-trivial BatchNorm values;
    ``l2`` > 0 adds L2 regularizers to the kernel, to γ and (if ``activity``) to the
    pooled features."""
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_regularizer=regularizer, name="conv")(
        inputs
    )
    if with_bn:
        x = keras.layers.BatchNormalization(
            momentum=MOMENTUM, epsilon=BN_EPSILON, gamma_regularizer=regularizer, name="bn"
        )(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(activity_regularizer=regularizer if activity else None)(
        x
    )
    net = keras.Model(inputs, keras.layers.Dense(CLASSES, name="dense")(x), name=name)
    if with_bn:
        bn = net.get_layer("bn")
        rng = np.random.default_rng(seed + 1)
        bn.gamma.assign(rng.uniform(0.5, 1.5, 4).astype("float32"))
        bn.beta.assign(rng.normal(0, 0.3, 4).astype("float32"))
        bn.moving_mean.assign(rng.normal(0, 0.3, 4).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, 4).astype("float32"))
    return net


def make_batches(count=STEPS, seed=5):
    """Pixels in [0, 1] with many near the ends, so clipping to the input range matters."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-0.3, 1.3, (count, BATCH, *SHAPE)).clip(0, 1).astype("float32")
    labels = rng.integers(0, CLASSES, (count, BATCH)).astype("int32")
    return images, labels


def dataset_of(*arrays):
    return tf.data.Dataset.from_tensor_slices(tuple(arrays))


def conadv_model(net, method="conadv", staleness=1, jit_compile=False, **kwargs):
    model = conadv_keras.ConAdvModel(
        net,
        method=method,
        staleness=staleness,
        attack_eps=EPS,
        input_range=INPUT_RANGE,
        label_smoothing=SMOOTHING,
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), metrics=["accuracy"], jit_compile=jit_compile)
    return model


# ------------------------------------------------------------------ the reference


def shared_weights(net) -> dict:
    """The convolution's and the dense layer's weights, by the reference's names."""
    return {
        "kernel": net.get_layer("conv").kernel.numpy(),
        "bias": net.get_layer("conv").bias.numpy(),
        "dense_kernel": net.get_layer("dense").kernel.numpy(),
        "dense_bias": net.get_layer("dense").bias.numpy(),
    }


def initial_parameters(net, with_bn=True) -> dict:
    """The reference's parameters, from the original (unconverted) model."""
    params = shared_weights(net)
    if with_bn:
        bn = net.get_layer("bn")
        for branch in ("main", "aux"):
            params[f"{branch}_gamma"] = bn.gamma.numpy()
            params[f"{branch}_beta"] = bn.beta.numpy()
    return {k: tf.constant(v) for k, v in params.items()}


def initial_statistics(net) -> dict:
    bn = net.get_layer("bn")
    return {
        branch: [bn.moving_mean.numpy().astype("float64"), bn.moving_variance.numpy()]
        for branch in ("main", "aux")
    }


def forward(params, x, branch, moments=None, features=False):
    """Training-mode logits through ``branch`` (and the pooled features, if ``features``);
    the branch's batch (mean, variance) is appended to ``moments``, if given."""
    h = tf.nn.conv2d(x, params["kernel"], 1, "SAME") + params["bias"]
    if f"{branch}_gamma" in params:
        mean = tf.reduce_mean(h, [0, 1, 2])
        variance = tf.reduce_mean(tf.square(h - mean), [0, 1, 2])
        if moments is not None:
            moments.append((branch, mean.numpy(), variance.numpy()))
        h = (h - mean) / tf.sqrt(variance + BN_EPSILON)
        h = h * params[f"{branch}_gamma"] + params[f"{branch}_beta"]
    h = tf.reduce_mean(tf.nn.relu(h), [1, 2])
    logits = h @ params["dense_kernel"] + params["dense_bias"]
    return (logits, h) if features else logits


def cross_entropy(labels, logits, smoothing):
    targets = tf.one_hot(labels, CLASSES) * (1 - smoothing) + smoothing / CLASSES
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits), axis=1)


def attack(params, images, labels, position):
    """One PGD step from a random start, through the auxiliary branch's batch statistics."""
    seed = tf.constant([0, position], tf.int64)  # [seed, position · replicas + replica]
    start = tf.random.experimental.stateless_split(seed, 2, alg="philox")[0]
    noise = attack_lib.stateless_uniform(images.shape, start, -EPS, EPS)
    x0 = tf.clip_by_value(images + noise, *INPUT_RANGE)
    with tf.GradientTape() as tape:
        tape.watch(x0)
        loss = tf.reduce_sum(cross_entropy(labels, forward(params, x0, "aux"), 0.0))
    step = x0 + EPS * tf.sign(tape.gradient(loss, x0))
    lower = tf.maximum(images - EPS, INPUT_RANGE[0])
    upper = tf.minimum(images + EPS, INPUT_RANGE[1])
    return tf.clip_by_value(step, lower, upper)


def objective(params, images, labels, branch, l2, replicas, moments, activity=True, weights=None):
    """One replica's share of one network's loss: Σ (weight ·) CE over its shard / global
    batch, plus its L2 penalties (the shared kernel's, its own γ's, its features' mean
    squared norm) over the replicas, as Keras divides ``model.losses``. Also the
    per-example (weighted) CE, the logits and the penalties (undivided)."""
    logits, pooled = forward(params, images, branch, moments, features=True)
    per_example = cross_entropy(labels, logits, SMOOTHING)
    if weights is not None:
        per_example = per_example * weights
    loss = tf.reduce_sum(per_example) / BATCH
    penalty = 0.0
    if l2:
        penalties = tf.reduce_sum(tf.square(params["kernel"]))
        if activity:
            penalties += tf.reduce_sum(tf.square(pooled)) / len(images)
        if f"{branch}_gamma" in params:
            penalties += tf.reduce_sum(tf.square(params[f"{branch}_gamma"]))
        penalty = l2 * penalties
        loss += penalty / replicas
    return loss, per_example, logits, penalty


def update(params, statistics, shards, l2=0.0, logs=None, activity=True):
    """θ − lr·∇ of the sum over the replicas' shards ``(images, labels, adversarial,
    weights)`` of ½·(clean objective (main) + adversarial objective (aux)), or of the clean
    objective alone (adversarial None), each example's two terms times its weight (weights
    None: 1). Each shard normalises with its own batch statistics; the moving statistics
    move toward their mean over the replicas. ``logs`` sums the per-example losses and
    correct answers."""
    names = sorted(params)
    moments = []
    with tf.GradientTape() as tape:
        tape.watch([params[n] for n in names])
        loss = 0.0
        for images, labels, adversarial, weights in shards:
            term, clean, logits, penalty = objective(
                params, images, labels, "main", l2, len(shards), moments, activity, weights
            )
            per_example = clean
            if adversarial is not None:
                adv_term, adv, _, adv_penalty = objective(
                    params, adversarial, labels, "aux", l2, len(shards), moments, activity, weights
                )
                term, per_example = 0.5 * (term + adv_term), 0.5 * (clean + adv)
                penalty = 0.5 * (penalty + adv_penalty)
                if logs is not None:
                    logs["adv_loss"] += float(tf.reduce_sum(adv))
            loss += term
            if logs is not None:
                # Keras logs each replica's mean loss plus its model.losses, per example.
                logs["loss"] += float(tf.reduce_sum(per_example) + len(labels) * penalty)
                logs["clean_loss"] += float(tf.reduce_sum(clean))
                logs["correct"] += int(np.sum(np.argmax(logits, 1) == labels.numpy()))
                logs["examples"] += len(labels)
    grads = tape.gradient(loss, [params[n] for n in names])
    if statistics is not None:
        for branch in ("main", "aux"):
            batch = [(m, v) for b, m, v in moments if b == branch]
            if batch:
                means, variances = (
                    np.mean([m for m, _ in batch], 0),
                    np.mean([v for _, v in batch], 0),
                )
                moving = statistics[branch]
                moving[0] = MOMENTUM * moving[0] + (1 - MOMENTUM) * means
                moving[1] = MOMENTUM * moving[1] + (1 - MOMENTUM) * variances
    return {n: params[n] - LR * (0.0 if g is None else g) for n, g in zip(names, grads)}


def reference_run(
    net,
    method,
    staleness,
    images,
    labels,
    with_bn=True,
    l2=0.0,
    replicas=1,
    activity=True,
    weights=None,
):
    """(parameters, moving statistics, logs) after STEPS steps of ``method``, eagerly, on
    ``replicas`` equal shards of every batch (with ``weights``, each example's terms
    weighted).

    ConAdv's stream is the ring's fill (the first τ batches) followed by the
    epoch's batches; step t trains on position t (its images, labels and
    weights), attacked with θ_{t−τ} (θ_0 for the fill), and attacks position
    t + τ with θ_t. Replica r attacks its shard of position p with the seed of
    p·replicas + r; the attack maximises the unweighted loss. ``logs`` holds the
    means Keras' History reports (loss, clean_loss, adv_loss, accuracy).
    """
    history = [initial_parameters(net, with_bn)]
    statistics = initial_statistics(net) if with_bn else None
    stream_images = [tf.constant(x) for x in images]
    stream_labels = [tf.constant(y) for y in labels]
    stream_weights = [None] * len(images)
    if weights is not None:
        stream_weights = [tf.constant(w) for w in weights]
    if method == "conadv":
        stream_images = stream_images[:staleness] + stream_images
        stream_labels = stream_labels[:staleness] + stream_labels
        stream_weights = stream_weights[:staleness] + stream_weights
    sums = dict(loss=0.0, clean_loss=0.0, adv_loss=0.0, correct=0, examples=0)
    for t in range(STEPS):
        shards = []
        weight_shards = [None] * replicas
        if stream_weights[t] is not None:
            weight_shards = tf.split(stream_weights[t], replicas)
        for r, (x, y) in enumerate(
            zip(tf.split(stream_images[t], replicas), tf.split(stream_labels[t], replicas))
        ):
            adversarial = None
            position = t * replicas + r
            if method == "conadv":
                adversarial = attack(history[max(t - staleness, 0)], x, y, position)
            elif method == "disadv":
                adversarial = attack(history[t], x, y, position)
            shards.append((x, y, adversarial, weight_shards[r]))
        history.append(update(history[t], statistics, shards, l2, sums, activity))
    examples = sums.pop("examples")
    logs = {key: value / examples for key, value in sums.items()}
    logs["accuracy"] = logs.pop("correct")
    if method == "vanilla":
        del logs["adv_loss"]
    return history[-1], statistics, logs


def network_parameters(model: conadv_keras.ConAdvModel, with_bn=True) -> dict:
    net = model.network
    params = shared_weights(net)
    if with_bn:
        bn = net.get_layer("bn")
        for branch in ("main", "aux"):
            values = bn.branch_variables(branch)
            params[f"{branch}_gamma"] = values["gamma"].numpy()
            params[f"{branch}_beta"] = values["beta"].numpy()
            params[f"{branch}_moving"] = [
                values["moving_mean"].numpy(),
                values["moving_variance"].numpy(),
            ]
    return params


class ReferenceTest(tf.test.TestCase):
    """Three steps of ``fit`` against the eager reference.

    Catches: ConAdv attacking with the weights after the update (θ_{t+1}), a ring
    slot off by one (τ = 2), the ring filled from other batches or attacked with
    another seed position, the input range not applied to the attack, the label
    smoothing or the ½ lost, a branch's statistics updated from the other branch's
    images, DisAdv attacking with stale weights, vanilla training the auxiliary
    branch.
    """

    def check(
        self,
        method,
        staleness,
        with_bn=True,
        jit_compile=False,
        tolerance=TOLERANCE,
        callbacks=(),
        l2=0.0,
        weights=None,
        **kwargs,
    ):
        images, labels = make_batches()
        net = small_net(with_bn, l2=l2)
        want, statistics, logs = reference_run(
            net, method, staleness, images, labels, with_bn, l2, weights=weights
        )
        model = conadv_model(net, method, staleness, jit_compile=jit_compile, **kwargs)
        batches = (images, labels) if weights is None else (images, labels, weights)
        history = model.fit(dataset_of(*batches), epochs=1, verbose=0, callbacks=list(callbacks))
        self.assertEqual(int(model.optimizer.iterations), STEPS)
        got = network_parameters(model, with_bn)
        for name, value in want.items():
            self.assertAllClose(got[name], value, atol=tolerance, rtol=tolerance, msg=name)
        if with_bn:
            for branch in ("main", "aux"):
                self.assertAllClose(
                    got[f"{branch}_moving"], statistics[branch], atol=tolerance, msg=branch
                )
        # The epoch's means (the logged loss with the regularizers' penalties).
        for key, value in logs.items():
            self.assertAllClose(history.history[key][0], value, rtol=tolerance, msg=key)
        return model, history

    def test_conadv_staleness_1(self):
        """Also what History and TensorBoard receive: the objective and its two parts."""
        logs = tempfile.mkdtemp(dir=self.get_temp_dir())
        tensorboard = keras.callbacks.TensorBoard(logs, update_freq=1)
        model, history = self.check("conadv", 1, callbacks=[tensorboard])
        self.assertEqual(set(history.history), {"loss", "clean_loss", "adv_loss", "accuracy"})
        clean, adv = history.history["clean_loss"][0], history.history["adv_loss"][0]
        self.assertAllClose(history.history["loss"][0], 0.5 * (clean + adv), rtol=1e-6)
        written = {}
        for path in glob.glob(os.path.join(logs, "train", "events.out.tfevents.*")):
            for event in event_file_loader.EventFileLoader(path).Load():
                for value in event.summary.value:
                    written[value.tag] = float(tensor_util.make_ndarray(value.tensor))
        for key, values in history.history.items():
            self.assertAllClose(written[f"epoch_{key}"], values[0], rtol=1e-6, msg=key)
        self.assertIn("batch_adv_loss", written)

    def test_conadv_staleness_2(self):
        self.check("conadv", 2)

    def test_regularizers_in_both_terms_with_either_update_pass(self):
        """Kernel, γ and activity L2 in the clean and the adversarial objective: the shared
        kernel's penalty once, each branch's γ penalty and features' penalty in its own
        network's half. Catches: ``model.losses`` dropped, the activity penalty of the one
        concatenated pass counted at full weight, both branches' γ penalties in each term."""
        for update_pass in ("concatenated", "separate"):
            self.check("conadv", 1, l2=0.05, update_pass=update_pass)
        self.check("disadv", 1, l2=0.05)

    def test_sample_weights_weight_both_terms_and_travel_in_the_ring(self):
        """Each example's clean and adversarial cross-entropy times its weight (zeros among
        them), in the update and the logged losses; ConAdv τ = 2 trains at step t the
        weights that came with its batch at step t − 2. Catches: a weight applied to the
        clean term only, the ring not keeping the weights (the incoming batch's used), the
        weights of the ring's slot off by one, the loss divided by the sum of weights."""
        rng = np.random.default_rng(9)
        weights = rng.uniform(0.0, 3.0, (STEPS, BATCH)).astype("float32")
        weights[:, :2] = 0.0
        self.check("conadv", 2, weights=weights)
        self.check("disadv", 1, weights=weights)
        self.check("vanilla", 1, weights=weights)

    def test_conadv_compiled_by_xla(self):
        """The TPU path: every replica step and the ring's fill as one XLA program
        (XLA reorders float32 work, hence 1e-4)."""
        model, _ = self.check("conadv", 2, jit_compile=True, tolerance=1e-4)
        self.assertTrue(model.jit_compile)

    def test_disadv_and_vanilla(self):
        self.check("disadv", 1)
        _, history = self.check("vanilla", 1)
        self.assertNotIn("adv_loss", history.history)

    def test_a_model_without_batch_norm_trains_its_shared_weights_with_a_warning(self):
        with self.assertWarnsRegex(UserWarning, "no BatchNormalization"):
            self.check("conadv", 1, with_bn=False)

    def test_fit_runs_main_py_s_step_functions(self):
        """fit against the prologue and step of conadv/steps.py, driven by hand as
        main.py's loop drives them, on the same model and stream (τ = 2)."""
        images, labels = make_batches()
        tau = 2
        model = conadv_model(small_net(), "conadv", tau)
        model.fit(dataset_of(images, labels), epochs=1, verbose=0)

        net = conadv_keras.split_batch_norm(small_net())
        optimizer = keras.optimizers.SGD(LR)
        optimizer.build(net.trainable_variables)
        ctx = steps_lib.StepContext(
            model=net,
            optimizer=optimizer,
            global_batch_size=BATCH,
            num_classes=CLASSES,
            label_smoothing=SMOOTHING,
            attack=attack_lib.AttackConfig(eps=EPS, input_min=0.0, input_max=1.0),
            ring=RingBuffer(tf.distribute.get_strategy(), tau, BATCH, SHAPE),
        )
        prologue = tf.function(steps_lib.build_conadv_prologue(ctx))
        step = tf.function(steps_lib.build_step("conadv", ctx))
        for i in range(tau):
            prologue((images[i], labels[i]), tf.constant(i, tf.int64))
        for t in range(STEPS):
            step((images[t], labels[t]))  # the epoch's batch t is stream position t + τ
        for got, want in zip(model.network.weights, net.weights):
            self.assertAllClose(got, want, atol=1e-6, rtol=1e-6, msg=got.path)

    def test_steps_per_execution_gives_the_same_steps(self):
        """Catches a loop that runs one step per call whatever steps_per_execution says
        (or one too many)."""
        images, labels = make_batches(count=4)
        runs = []
        for per_call in (1, 2):
            model = conadv_keras.ConAdvModel(
                small_net(), staleness=1, attack_eps=EPS, input_range=INPUT_RANGE
            )
            model.compile(optimizer=keras.optimizers.SGD(LR), steps_per_execution=per_call)
            model.fit(dataset_of(images, labels), epochs=1, verbose=0)
            self.assertEqual(int(model.optimizer.iterations), 4)
            runs.append(model.network.get_weights())
        for a, b in zip(*runs):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)


class EvaluateAndExportTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        images, labels = make_batches(count=4, seed=9)
        cls.x, cls.y = images.reshape(-1, *SHAPE), labels.reshape(-1)
        cls.model = conadv_model(small_net(), "conadv", 1)
        cls.model.fit(cls.x, cls.y, batch_size=BATCH, epochs=2, verbose=0)

    def test_export_loads_with_plain_keras_and_predicts_the_main_branch(self):
        """Catches: the auxiliary branch exported, the split layer left in the file (it
        would need custom objects), weights not copied into the plain model."""
        plain = self.model.export_model()
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "model.keras")
        plain.save(path)
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        modules = set()

        def collect(node):
            if isinstance(node, dict):
                if "module" in node and "class_name" in node:
                    modules.add(node["module"])
                for value in node.values():
                    collect(value)
            elif isinstance(node, list):
                for value in node:
                    collect(value)

        collect(config)
        self.assertTrue(all(m.startswith("keras") for m in modules), modules)
        loaded = keras.models.load_model(path)
        self.assertEmpty(
            [x for x in loaded._flatten_layers() if isinstance(x, SplitBatchNormalization)]
        )
        predicted = self.model.predict(self.x, verbose=0)
        self.assertAllClose(loaded.predict(self.x, verbose=0), predicted, atol=1e-5, rtol=1e-5)
        aux = call_model(self.model.network, self.x, False, "aux").numpy()
        self.assertGreater(np.abs(aux - predicted).max(), 1e-3)  # the branches differ

    def test_evaluate_reports_keras_own_loss_of_the_main_branch(self):
        """What Keras' own evaluate reports for the plain (exported) model compiled with
        ``SparseCategoricalCrossentropy(from_logits=True)``: no label smoothing (the
        training loss has 0.1), sample weights in the loss (``metrics`` are unweighted,
        ``weighted_metrics`` weighted, as in Keras), no training-only logs.

        Catches: the label-smoothed loss, sample weights ignored, the auxiliary branch."""
        logits = call_model(self.model.network, self.x, False, "main")
        weights = np.linspace(0.0, 2.0, len(self.y)).astype("float32")
        plain = self.model.export_model()
        plain.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            weighted_metrics=["accuracy"],
        )
        self.model.compile(
            optimizer=self.model.optimizer, metrics=["accuracy"], weighted_metrics=["accuracy"]
        )
        for sample_weight in (None, weights):
            logs = self.model.evaluate(
                self.x, self.y, sample_weight=sample_weight, verbose=0, return_dict=True
            )
            want = plain.evaluate(
                self.x, self.y, sample_weight=sample_weight, verbose=0, return_dict=True
            )
            self.assertEqual(set(logs), set(want))
            for key in want:
                self.assertAllClose(logs[key], want[key], rtol=1e-5, msg=key)
            w = np.ones(len(self.y)) if sample_weight is None else sample_weight
            by_hand = (w * cross_entropy(self.y, logits, 0.0).numpy()).mean()
            self.assertAllClose(logs["loss"], by_hand, rtol=1e-5)


class PreciseBatchNormTest(tf.test.TestCase):
    def test_precise_bn_sets_the_main_branch_to_the_population_statistics(self):
        """The BatchNorm's inputs are the convolution's outputs: their mean and biased
        variance over every example of the batches used. Catches: the auxiliary branch
        set, statistics of the last batch only, a batch too many, nothing applied."""
        images, labels = make_batches(count=3, seed=11)
        model = conadv_keras.ConAdvModel(small_net())
        bn = model.network.get_layer("bn")
        aux_before = [v.numpy() for v in bn.branch_variables("aux").values()]
        statistics = model.precise_bn(dataset_of(images, labels), batches=2)
        self.assertEqual((statistics.batches, statistics.examples), (2, 2 * BATCH))
        conv = model.network.get_layer("conv")
        inputs = conv(images[:2].reshape(-1, *SHAPE)).numpy().astype("float64")
        main = bn.branch_variables("main")
        self.assertAllClose(main["moving_mean"], inputs.mean((0, 1, 2)), atol=1e-5, rtol=1e-5)
        self.assertAllClose(main["moving_variance"], inputs.var((0, 1, 2)), atol=1e-5, rtol=1e-4)
        for before, after in zip(aux_before, bn.branch_variables("aux").values()):
            self.assertAllEqual(before, after)

    def test_a_frozen_batch_norm_keeps_its_statistics_and_a_shared_one_gets_all_its_calls(self):
        """A fine-tuning model: a frozen BatchNorm (its moving statistics stay, as Keras keeps
        them) and a BatchNorm called on two branches of the graph (its statistics are those
        of its inputs in both calls, against NumPy).

        Catches: a frozen BatchNorm's statistics overwritten (or a refusal of the model);
        the statistics of only one call of the shared BatchNorm."""
        keras.utils.set_random_seed(2)
        inputs = keras.Input(SHAPE)
        frozen = keras.layers.BatchNormalization(name="frozen")
        shared = keras.layers.BatchNormalization(name="shared")
        left = keras.layers.Conv2D(4, 3, padding="same", name="left")
        right = keras.layers.Conv2D(4, 1, name="right")
        h = frozen(inputs)
        both = keras.layers.Concatenate()([shared(left(h)), shared(right(h) + 2.0)])
        outputs = keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling2D()(both))
        net = keras.Model(inputs, outputs)
        net.get_layer("frozen").moving_mean.assign([0.1, 0.2, 0.3])
        net.get_layer("frozen").trainable = False
        model = conadv_keras.ConAdvModel(net)
        frozen_before = [v.numpy() for v in model.network.get_layer("frozen").weights]
        images, labels = make_batches(count=2, seed=13)
        model.precise_bn(dataset_of(images, labels), batches=2)
        for before, after in zip(frozen_before, model.network.get_layer("frozen").weights):
            self.assertAllEqual(before, after)
        # The frozen layer normalises with its moving statistics: compute its output so.
        x = images.reshape(-1, *SHAPE)
        h = model.network.get_layer("frozen")(x, training=False)
        calls = np.concatenate(
            [
                model.network.get_layer("left")(h).numpy().reshape(-1, 4),
                (model.network.get_layer("right")(h).numpy() + 2.0).reshape(-1, 4),
            ]
        ).astype("float64")
        main = model.network.get_layer("shared").branch_variables("main")
        self.assertAllClose(main["moving_mean"], calls.mean(0), atol=1e-5, rtol=1e-5)
        self.assertAllClose(main["moving_variance"], calls.var(0), atol=1e-5, rtol=1e-4)


class RefusalTest(tf.test.TestCase):
    def assertOneLine(self, error):
        self.assertNotIn("\n", str(error))

    def test_a_subclassed_model_with_batch_norm_is_refused(self):
        class Subclassed(keras.Model):
            def __init__(self):
                super().__init__()
                self.bn = keras.layers.BatchNormalization()
                self.dense = keras.layers.Dense(CLASSES)

            def call(self, x, training=False):
                return self.dense(keras.ops.mean(self.bn(x, training=training), [1, 2]))

        model = Subclassed()
        model(np.zeros((1, *SHAPE), "float32"))
        with self.assertRaisesRegex(conadv_keras.ConversionError, "functional") as caught:
            conadv_keras.ConAdvModel(model)
        self.assertOneLine(caught.exception)

    def test_a_final_activation_other_than_softmax_is_refused(self):
        inputs = keras.Input(SHAPE)
        x = keras.layers.GlobalAveragePooling2D()(inputs)
        dense_sigmoid = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="sigmoid")(x))
        relu_layer = keras.Model(
            inputs, keras.layers.Activation("relu")(keras.layers.Dense(CLASSES)(x))
        )
        for net, name in ((dense_sigmoid, "sigmoid"), (relu_layer, "relu")):
            with self.assertRaisesRegex(conadv_keras.ConversionError, name) as caught:
                conadv_keras.ConAdvModel(net)
            self.assertOneLine(caught.exception)

    def test_a_softmax_hidden_in_a_lambda_layer_is_refused_at_fit(self):
        """Catches a softmax the conversion cannot see, trained as if it gave logits."""
        inputs = keras.Input(SHAPE)
        x = keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling2D()(inputs))
        hidden = keras.Model(inputs, keras.layers.Lambda(keras.ops.softmax)(x))
        model = conadv_keras.ConAdvModel(hidden, attack_eps=EPS, input_range=INPUT_RANGE)
        model.compile(optimizer="sgd")
        images, labels = make_batches()
        with self.assertRaisesRegex(conadv_keras.ConversionError, "probabilities") as caught:
            model.fit(dataset_of(images[0], labels[0]).batch(4), verbose=0)
        self.assertOneLine(caught.exception)
        self.assertEqual(int(model.optimizer.iterations), 0)

    def test_a_compiled_loss_weights_and_odd_inputs_are_refused(self):
        model = conadv_keras.ConAdvModel(small_net())
        with self.assertRaisesRegex(ValueError, "without loss"):
            model.compile(optimizer="sgd", loss="mse")
        model.compile(optimizer="sgd")
        images, labels = make_batches()
        x, y = images.reshape(-1, *SHAPE), labels.reshape(-1)
        weights = np.ones(len(y))
        batches = dataset_of(x, y).batch(4)
        refusals = (
            (lambda: model.fit(x, batch_size=4, verbose=0), "labels"),
            (
                lambda: model.fit(x, y, 4, sample_weight=weights, class_weight={0: 2.0}),
                "class_weight or sample weights, not both",
            ),
            (lambda: model.fit(batches, validation_split=0.2, verbose=0), "validation_data"),
            (lambda: model.fit(batches, sample_weight=weights, verbose=0), "in its batches"),
            (lambda: model.fit(iter([(x, y)]), class_weight={0: 2.0}), "yield"),
            (lambda: model.fit([x, y], verbose=0), "generator of"),
            (lambda: model.fit(x, np.zeros((len(y), 2)), batch_size=4, verbose=0), "one-hot"),
            (
                lambda: model.fit(dataset_of(x, y, np.ones((len(y), 2))).batch(4), verbose=0),
                r"sample weights of shape \(batch,\)",
            ),
        )
        for fit, expected in refusals:
            with self.assertRaisesRegex(ValueError, expected) as caught:
                fit()
            self.assertOneLine(caught.exception)

    def test_a_dataset_without_labels_is_refused_for_its_labels(self):
        """Catches the missing labels reported as something else (sample weights)."""
        model = conadv_keras.ConAdvModel(small_net())
        model.compile(optimizer="sgd")
        images, labels = make_batches()
        x, y = images.reshape(-1, *SHAPE), labels.reshape(-1)
        no_labels = (
            (
                tf.data.Dataset.from_tensor_slices(x).batch(4),
                r"one tensor of shape \(None, 6, 6, 3\) \(float32\)",
            ),
            (dataset_of(x).batch(4), "one tensor of shape"),  # (images,)
            (tf.data.Dataset.from_tensor_slices({"image": x}).batch(4), r"a dict of \['image'\]"),
        )
        for data, alone in no_labels:
            with self.assertRaisesRegex(ValueError, "no labels") as caught:
                model.fit(data, verbose=0)
            message = str(caught.exception)
            self.assertRegex(message, "got batches of " + alone)
            self.assertIn("give a dataset of (images, labels)", message)
            self.assertNotIn("weight", message)
            self.assertOneLine(caught.exception)
        with self.assertRaisesRegex(ValueError, "got batches of 4 components"):
            model.fit(dataset_of(x, y, y, y).batch(4), verbose=0)
        self.assertEqual(int(model.optimizer.iterations), 0)


class BackupAndRestoreTest(tf.test.TestCase):
    """What ``keras.callbacks.BackupAndRestore`` gives back: weights and optimizer, not the
    ring, which is refilled from the restored weights.

    Catches a ring filled before the callback restores (with the initial weights)
    or kept from before a ``load_weights``.
    """

    def test_a_resumed_fit_refills_the_ring_from_the_restored_weights(self):
        images, labels = make_batches(count=2)
        data = dataset_of(images, labels)
        backup = tempfile.mkdtemp(dir=self.get_temp_dir())
        saved = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "epoch1.weights.h5")

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == 1:
                    shutil.copy(os.path.join(backup, "latest.weights.h5"), saved)
                    raise RuntimeError("interrupted")

        first = conadv_model(small_net(), "conadv", 1)
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            first.fit(
                data,
                epochs=2,
                verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()],
            )
        resumed = conadv_model(small_net(), "conadv", 1)
        resumed.fit(data, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
        self.assertEqual(int(resumed.optimizer.iterations), 4)

        # By hand: the weights and optimizer of epoch 1, a fresh ring, one epoch.
        by_hand = conadv_model(small_net(), "conadv", 1)
        by_hand.optimizer.build(by_hand.trainable_variables)
        by_hand.load_weights(saved)
        self.assertEqual(int(by_hand.optimizer.iterations), 2)
        by_hand.fit(data, epochs=1, verbose=0)
        for got, want in zip(resumed.network.weights, by_hand.network.weights):
            self.assertAllClose(got, want, atol=1e-6, rtol=1e-6, msg=got.path)

        # A load_weights on a model that has trained marks its ring for refilling.
        by_hand.load_weights(saved)
        self.assertFalse(by_hand._fit.ring_ready)
