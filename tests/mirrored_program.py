"""Runs the three methods under MirroredStrategy on 2 logical CPU devices; prints JSON.

A separate process, because logical devices must be configured before
TensorFlow initialises its devices (tests/test_mirrored.py starts it).
"""

import functools
import json

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)
# Grappler's graph rewrites of these many-replica graphs take longer than running
# them; what this program checks is the numbers, which do not depend on them.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

import keras  # noqa: E402

from conadv import attack as attack_lib  # noqa: E402
from conadv import steps as steps_lib  # noqa: E402
from official import optimizers, precision, resnet  # noqa: E402
from official.split_batch_norm import SplitBatchNormalization, call_model  # noqa: E402
from tests import method_testing as mt  # noqa: E402
from tests import precise_bn_checks  # noqa: E402

BATCH = 8
REPLICAS = 2
# What train() gives the step context (tests/method_testing.make_context).
LR, WD, MOMENTUM, EPS, SEED = 0.1, 1e-4, 0.9, 8.0, 3


def model_for(strategy, synchronized):
    with strategy.scope():
        return resnet.resnet(
            "resnet8",
            num_classes=mt.NUM_CLASSES,
            image_size=mt.IMAGE_SIZE,
            width_multiplier=0.5,
            bn_group_size=0 if synchronized else 1,
            seed=2,
        )


def train(strategy, method, images, labels, steps, synchronized=True, accumulation=1, frozen=False):
    """The model and step context after ``steps`` steps, and the initial trainable weights."""
    model = model_for(strategy, synchronized)
    if frozen:  # BatchNorm on moving statistics (Keras' trainable=False)
        for layer in model._flatten_layers():
            if isinstance(layer, SplitBatchNormalization):
                layer.trainable = False
    ctx = mt.make_context(
        model,
        learning_rate=0.1,
        optimizer="momentum",
        weight_decay=1e-4,
        staleness=1 if method == "conadv" else None,
        batch_size=BATCH,
        strategy=strategy,
        accumulation_steps=accumulation,
    )
    if accumulation > 1:  # each step's batch as consecutive micro-batches
        steps_in_data, batch = labels.shape
        images = images.reshape(
            steps_in_data * accumulation, batch // accumulation, *images.shape[2:]
        )
        labels = labels.reshape(steps_in_data * accumulation, batch // accumulation)
    iterator = mt.batch_iterator(images, labels, strategy)
    if method == "conadv":
        mt.fill_ring(ctx, iterator, strategy)
    run = mt.step_runner(ctx, method, strategy)
    initial = mt.trainable_snapshot(model)
    for _ in range(steps):
        run(iterator)
    return model, ctx, initial


# --------------------------------------------------------------------------
# One-device reference for DisAdv and ConAdv on 2 replicas with BatchNorm over
# the global batch, written from the method's equations (not from
# conadv/steps.py): each replica attacks its own half with its own batch
# statistics (seed [SEED, batch index · replicas + replica]); the update is
# the gradient of ½·(Σ CE(clean, main) + Σ CE(adv, aux)) over all 8 rows,
# divided by the global batch 8. A per-replica loss divided by the replica's
# 4 rows would double every step.


def reference_attack(model, x, y, key):
    """One step of L∞ PGD (step ε) from a random start, on the aux branch's own statistics."""
    x = tf.constant(x)
    start_seed = tf.random.experimental.stateless_split(tf.constant(key, tf.int64), 2, "philox")[0]
    x0 = tf.clip_by_value(x + attack_lib.stateless_uniform(x.shape, start_seed, -EPS, EPS), 0, 255)
    with tf.GradientTape() as tape:
        tape.watch(x0)
        logits = call_model(model, x0, True, "aux", update_stats=False)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    step = x0 + EPS * tf.sign(tape.gradient(loss, x0))
    return tf.clip_by_value(step, tf.maximum(x - EPS, 0.0), tf.minimum(x + EPS, 255.0)).numpy()


def reference_adversarial_training(method, images, labels, initial, steps):
    """Trainable weights after ``steps`` DisAdv or ConAdv (τ = 1) steps on one device."""
    model = model_for(tf.distribute.get_strategy(), synchronized=True)
    for var, value in zip(model.trainable_variables, initial):
        var.assign(value)
    velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    half = BATCH // REPLICAS

    def attack(t):  # batch t, each replica's half on its own, with the current weights
        rows = [slice(r * half, (r + 1) * half) for r in range(REPLICAS)]
        return np.concatenate(
            [
                reference_attack(model, images[t][s], labels[t][s], [SEED, t * REPLICAS + r])
                for r, s in enumerate(rows)
            ]
        )

    adversarial = {0: attack(0)} if method == "conadv" else {}  # ConAdv's prologue
    for t in range(steps):
        if method == "conadv":
            adversarial[t + 1] = attack(t + 1)  # with θ_t, used at step t + 1
        else:
            adversarial[t] = attack(t)
        with tf.GradientTape() as tape:
            clean = call_model(model, images[t], True, "main", update_stats=True)
            adv = call_model(model, adversarial[t], True, "aux", update_stats=True)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits
            loss = 0.5 * (tf.reduce_sum(ce(labels[t], clean)) + tf.reduce_sum(ce(labels[t], adv)))
            loss = loss / BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        for i, (var, g) in enumerate(zip(model.trainable_variables, grads)):
            w = var.numpy()
            decay = WD * w if w.ndim > 1 else 0.0
            velocity[i] = MOMENTUM * velocity[i] + LR * (g.numpy() + decay)
            var.assign(w - velocity[i])
    return mt.trainable_snapshot(model)


def overflow_on_one_replica(strategy, optimizer_class):
    """One vanilla step where only replica 1's shard overflows (an Inf pixel).

    Returns (trainable weights unchanged, all finite, iterations, scale ratio).
    """
    images, labels = mt.fixed_batches(1, BATCH, seed=4)
    images[0, BATCH - 1, 0, 0, 0] = np.inf  # the last image: replica 1's half
    model = model_for(strategy, synchronized=False)
    with strategy.scope():
        inner = optimizers.build_optimizer("momentum", learning_rate=0.1, momentum=0.9)
        optimizer = optimizer_class(inner)
        optimizer.build(model.trainable_variables)
    ctx = steps_lib.StepContext(
        model=model, optimizer=optimizer, global_batch_size=BATCH, num_classes=mt.NUM_CLASSES
    )
    # Trainable weights only: the moving statistics do see the Inf (as they would
    # in any framework); what loss scaling must protect is the update.
    before = [v.numpy() for v in model.trainable_variables]
    scale = float(optimizer.dynamic_scale.numpy())
    mt.step_runner(ctx, "vanilla", strategy)(mt.batch_iterator(images, labels, strategy))
    after = [v.numpy() for v in model.trainable_variables]
    return {
        "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
        "finite": all(np.all(np.isfinite(v)) for v in after),
        "iterations": int(optimizer.iterations.numpy()),
        "scale_ratio": float(optimizer.dynamic_scale.numpy()) / scale,
    }


def keras_fit(mirrored):
    """ConAdvModel.fit (τ = 2, steps_per_execution 2) on 2 replicas against one device.

    BatchNorm frozen (moving statistics) and no random start, so the replica
    split changes nothing and the two runs must agree; after 4 steps slot 0
    holds batch 2 and slot 1 batch 3, each replica its own half of the rows.
    """
    from conadv.keras import ConAdvModel
    from tests import test_keras_model as km

    images, labels = km.make_batches(count=4, seed=7)
    out = {}
    for name, strategy, per_call in (
        ("mirrored", mirrored, 2),
        ("single", tf.distribute.get_strategy(), 1),
    ):
        with strategy.scope():
            net = km.small_net()
            net.get_layer("bn").trainable = False
            model = ConAdvModel(
                net,
                staleness=2,
                attack_eps=km.EPS,
                input_range=km.INPUT_RANGE,
                attack_random_init=False,
            )
            model.compile(
                optimizer=keras.optimizers.SGD(km.LR),
                metrics=["accuracy"],
                steps_per_execution=per_call,
            )
        initial = [w.copy() for w in model.network.get_weights()]
        last_batch = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs, key=f"{name}_batch_logs": out.update(
                {key: {k: float(v) for k, v in logs.items()}}
            )
        )
        history = model.fit(
            km.dataset_of(images, labels), epochs=1, verbose=0, callbacks=[last_batch]
        )
        out[name] = {
            "iterations": int(model.optimizer.iterations.numpy()),
            "weights": model.network.get_weights(),
            "moved": max(
                float(np.abs(a - b).max()) for a, b in zip(model.network.get_weights(), initial)
            ),
            "history": {k: v[0] for k, v in history.history.items()},
        }
        if name == "mirrored":
            half = km.BATCH // 2
            out["ring_rows_match"] = [
                bool(
                    np.array_equal(
                        model._fit.ring.local_slots("labels")[r][slot].numpy(),
                        labels[batch][r * half : (r + 1) * half],
                    )
                    and np.array_equal(
                        model._fit.ring.local_slots("images")[r][slot].numpy(),
                        images[batch][r * half : (r + 1) * half],
                    )
                )
                for r in range(2)
                for slot, batch in ((0, 2), (1, 3))
            ]
    a, b = out.pop("mirrored"), out.pop("single")
    out["iterations"] = [a["iterations"], b["iterations"]]
    out["max_weight_diff"] = max(
        float(np.abs(x - y).max()) for x, y in zip(a["weights"], b["weights"])
    )
    out["single_moved"] = b["moved"]
    out["history"] = [a["history"], b["history"]]
    # What callbacks see after the last call (the epoch's logs are recomputed by Keras).
    out["batch_logs"] = [out.pop("mirrored_batch_logs"), out.pop("single_batch_logs")]
    return out


def keras_fit_live_batch_norm(mirrored):
    """ConAdvModel.fit (τ = 1, BatchNorm training, random start) on 2 replicas against the
    eager reference of test_keras_model on the same two shards (each normalised with its
    own batch statistics, attacked with its own seed; the moving statistics averaged)."""
    from tests import test_keras_model as km

    images, labels = km.make_batches()
    initial = km.initial_parameters(km.small_net())
    # With kernel and γ regularizers: each replica adds its share.
    net = functools.partial(km.small_net, l2=0.05, activity=False)
    want, statistics, logs = km.reference_run(
        net(), "conadv", 1, images, labels, l2=0.05, replicas=REPLICAS, activity=False
    )
    with mirrored.scope():
        model = km.conadv_model(net(), "conadv", 1)
    history = model.fit(km.dataset_of(images, labels), epochs=1, verbose=0)
    # An activity regularizer is refused on several local replicas.
    with mirrored.scope():
        refused = km.conadv_model(km.small_net(l2=0.05), "conadv", 1)
    try:
        refused.fit(km.dataset_of(images, labels), epochs=1, verbose=0)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    got = km.network_parameters(model)
    return {
        "iterations": int(model.optimizer.iterations.numpy()),
        "weight_error": max(float(np.abs(got[k] - v).max()) for k, v in want.items()),
        "reference_moved": max(float(np.abs(want[k] - v).max()) for k, v in initial.items()),
        "statistics_error": max(
            float(np.abs(np.asarray(got[f"{b}_moving"]) - np.asarray(statistics[b])).max())
            for b in ("main", "aux")
        ),
        "history": {k: v[0] for k, v in history.history.items()},
        "reference_logs": logs,
        "activity_refusal": refusal,
    }


def sharpness_on_two_replicas(mirrored):
    """The top Hessian eigenvalue of a small split-BatchNorm network's loss on 2 replicas and
    on one device: the all-reduced loss's, so the replica count must not change it."""
    from conadv.studies import sharpness
    from tests import test_sharpness as ts

    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (24, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 3, 24).astype("int32")
    out = {}
    for name, strategy in (("mirrored", mirrored), ("single", tf.distribute.get_strategy())):
        with strategy.scope():
            model = ts.small_network()
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        loss = sharpness.TrainingLoss(
            model, strategy, strategy.experimental_distribute_dataset(dataset), len(y), 0.1
        )
        out[name] = sharpness.top_eigenvalue(loss, iterations=200, tolerance=1e-7)
    return out


def free_attack_on_two_replicas(mirrored, images, labels):
    """DisAdv with the free attack and with the separate attack (1 step from the clean
    image, main branch, no smoothing) on 2 replicas, each normalising by its own half:
    the largest difference of any variable and of the losses after 3 steps."""
    out = {}
    for source in (steps_lib.CLEAN_PASS, steps_lib.SEPARATE_ATTACK):
        model = model_for(mirrored, synchronized=False)
        ctx = mt.make_context(
            model,
            weight_decay=WD,
            batch_size=BATCH,
            strategy=mirrored,
            attack=attack_lib.AttackConfig(eps=EPS, random_init=False, bn_branch="main"),
            attack_source=source,
        )
        initial = mt.snapshot(model)
        iterator = mt.batch_iterator(images, labels, mirrored)
        run = mt.step_runner(ctx, "disadv", mirrored)
        for _ in range(3):
            run(iterator)
        totals = ctx.sums.totals()
        out[source] = (mt.snapshot(model), [totals["clean_loss"], totals["adv_loss"]], initial)
    free, separate = out[steps_lib.CLEAN_PASS], out[steps_lib.SEPARATE_ATTACK]
    return {
        "max_variable_difference": max(
            float(np.max(np.abs(a - b))) for a, b in zip(free[0], separate[0])
        ),
        "max_loss_difference": max(abs(a - b) for a, b in zip(free[1], separate[1])),
        "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(free[0], free[2])),
    }


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    images, labels = mt.fixed_batches(5, BATCH, seed=3)
    out = {"replicas": mirrored.num_replicas_in_sync, "methods": {}}

    for method in ("vanilla", "disadv", "conadv"):
        model, ctx, initial = train(mirrored, method, images, labels, steps=2)
        finite = all(np.all(np.isfinite(v.numpy())) for v in model.variables)
        out["methods"][method] = {
            "steps": int(ctx.optimizer.iterations.numpy()),
            "finite": bool(finite),
            "examples": ctx.sums.totals()["examples"],
        }
        if method != "vanilla":
            want = reference_adversarial_training(method, images, labels, initial, steps=2)
            got = mt.trainable_snapshot(model)
            out["methods"][method]["update_error"] = mt.update_error(initial, got, want)
            out["methods"][method]["reference_moved"] = max(
                float(np.max(np.abs(w - w0))) for w, w0 in zip(want, initial)
            )
        if method == "conadv":
            # Prologue took batch 0; steps 0 and 1 took batches 1 and 2, so the
            # ring now holds batch 2, split between the replicas in order.
            half = BATCH // 2
            out["ring_replica_images_match"] = [
                bool(
                    np.array_equal(
                        ctx.ring.local_slots("images")[r][0].numpy(),
                        images[2][r * half : (r + 1) * half],
                    )
                )
                for r in range(2)
            ]
            out["ring_replicas_differ"] = bool(
                not np.array_equal(
                    ctx.ring.local_slots("adversarial")[0][0].numpy(),
                    ctx.ring.local_slots("adversarial")[1][0].numpy(),
                )
            )

    sync_model, _, _ = train(mirrored, "vanilla", images, labels, steps=3, synchronized=True)
    ref_model, _, _ = train(single, "vanilla", images, labels, steps=3, synchronized=False)
    local_model, _, _ = train(mirrored, "vanilla", images, labels, steps=3, synchronized=False)

    def max_rel_diff(a, b):
        worst = 0.0
        for x, y in zip(a.variables, b.variables):
            x, y = x.numpy(), y.numpy()
            worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-6)))
        return worst

    # Precise BatchNorm: each replica's shard normalised by its own batch moments, the
    # population sums added across the two replicas (tests/precise_bn_checks.py).
    out["precise_bn"] = precise_bn_checks.check(mirrored, batches_in_data=4, batches_used=3)
    out["sync_vs_single_max_rel_diff"] = max_rel_diff(sync_model, ref_model)
    out["unsync_vs_single_max_rel_diff"] = max_rel_diff(local_model, ref_model)
    out["overflow"] = {
        "ours": overflow_on_one_replica(mirrored, precision.LossScaleOptimizer),
        "keras": overflow_on_one_replica(mirrored, keras.optimizers.LossScaleOptimizer),
    }
    # Gradient accumulation on 2 replicas: N = 2 micro-batches per step.
    frozen_one, _, _ = train(mirrored, "vanilla", images, labels, steps=2, frozen=True)
    frozen_two, _, _ = train(
        mirrored, "vanilla", images, labels, steps=2, frozen=True, accumulation=2
    )
    out["accumulation_frozen_max_rel_diff"] = max_rel_diff(frozen_two, frozen_one)
    model, ctx, _ = train(mirrored, "conadv", images, labels, steps=2, accumulation=2)
    quarter = BATCH // 4  # a replica's share of a micro-batch
    micro = images.reshape(-1, BATCH // 2, *images.shape[2:])
    out["accumulation_conadv"] = {
        "steps": int(ctx.optimizer.iterations.numpy()),
        "finite": bool(all(np.all(np.isfinite(v.numpy())) for v in model.variables)),
        "examples": ctx.sums.totals()["examples"],
        "ring_slots": ctx.ring.staleness,
        # After steps 0 and 1, slot i of replica r holds micro-batch 2·2 + i, rows of r.
        "ring_holds_step_2": [
            bool(
                np.array_equal(
                    ctx.ring.local_slots("images")[r][i].numpy(),
                    micro[4 + i][r * quarter : (r + 1) * quarter],
                )
            )
            for r in range(2)
            for i in range(2)
        ],
    }
    out["keras_fit"] = keras_fit(mirrored)
    out["keras_fit_live_batch_norm"] = keras_fit_live_batch_norm(mirrored)
    out["sharpness"] = sharpness_on_two_replicas(mirrored)
    out["free_attack"] = free_attack_on_two_replicas(mirrored, images, labels)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
