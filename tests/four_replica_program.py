"""Ring buffer, checkpoint and BatchNorm groups under MirroredStrategy on 4 logical CPUs.

A separate process (logical devices must be configured before TensorFlow
starts); tests/test_four_replicas.py runs it and checks what it prints.
"""

import json
import sys
import tempfile

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 4
)
# Grappler's graph rewrites of these many-replica graphs take longer than running
# them; what this program checks is the numbers, which do not depend on them.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

from conadv import attack as attack_lib  # noqa: E402
from conadv import steps as steps_lib  # noqa: E402
from conadv.ring_buffer import RingBuffer  # noqa: E402
from official import resnet  # noqa: E402
from official.split_batch_norm import SplitBatchNormalization, call_model  # noqa: E402
from tests import method_testing as mt  # noqa: E402

REPLICAS = 4


def max_relative_difference(a, b) -> float:
    """The largest per-variable max |a − b| / max |b| over two lists of arrays."""
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-6)) for x, y in zip(a, b))


def tiny_model(bn_group_size: int = 1):
    """ResNet-8 ×0.25 at 16 px with fixed initial weights (call inside a strategy's scope)."""
    return resnet.resnet(
        "resnet8",
        mt.NUM_CLASSES,
        image_size=mt.IMAGE_SIZE,
        width_multiplier=0.25,
        bn_group_size=bn_group_size,
        seed=5,
    )


def local(values, strategy):
    return [t.numpy().tolist() for t in strategy.experimental_local_results(values)]


def ring_round_trip(strategy):
    """Each replica writes its own values in one call and reads them back in later ones."""
    ring = RingBuffer(strategy, staleness=2, per_replica_batch=2, image_size=2)

    @tf.function
    def write(slot, base):
        def fn():
            rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32)
            images = tf.fill([2, 2, 2, 3], base * 100.0 + rid)
            labels = tf.fill([2], tf.cast(base, tf.int32) * 10 + tf.cast(rid, tf.int32))
            ring.write(slot, images, labels, images + 0.5)

        strategy.run(fn)

    @tf.function
    def read(slot):
        return strategy.run(lambda: ring.read(slot))

    write(tf.constant(0), tf.constant(1.0))
    write(tf.constant(1), tf.constant(2.0))
    out = {}
    for slot in (0, 1):
        images, labels, adversarial = read(tf.constant(slot))
        out[slot] = {
            "images": [float(np.unique(x)[0]) for x in np.array(local(images, strategy))],
            "labels": [int(np.unique(x)[0]) for x in np.array(local(labels, strategy))],
            "adversarial": [float(np.unique(x)[0]) for x in np.array(local(adversarial, strategy))],
        }
    write(tf.constant(0), tf.constant(3.0))  # overwrites slot 0 only
    out["slot0_after_rewrite"] = [
        float(np.unique(x)[0]) for x in np.array(local(read(tf.constant(0))[0], strategy))
    ]
    out["slot1_after_rewrite"] = [
        float(np.unique(x)[0]) for x in np.array(local(read(tf.constant(1))[0], strategy))
    ]
    return out


def checkpoint_round_trip(strategy, model_dir):
    """A trained ConAdv trainer's rings, saved and restored into a fresh trainer."""
    trainer = mt.small_trainer(model_dir, strategy, method="conadv", train_steps=2)
    trainer.train(evaluate=False)
    saved = {
        name: [v.numpy() for v in trainer.ring.local_slots(name)]
        for name in ("images", "labels", "adversarial")
    }
    path = trainer.checkpoints.manager.latest_checkpoint
    # Everything saved for the ring (the model and optimizer are checked elsewhere).
    keys = {name: shape for name, shape in tf.train.list_variables(path) if "ring" in name.lower()}
    fresh = mt.small_trainer(model_dir, strategy, method="conadv", train_steps=2)
    before = [v.numpy().copy() for v in fresh.ring.local_slots("adversarial")]
    fresh.restore()
    exact = all(
        np.array_equal(a, b.numpy())
        for name in saved
        for a, b in zip(saved[name], fresh.ring.local_slots(name))
    )
    return {
        "keys": keys,
        "layout": trainer.ring.layout,
        "exact": bool(exact),
        "filled": fresh.ring.is_filled(),
        "replicas_differ": bool(
            not np.array_equal(saved["adversarial"][0], saved["adversarial"][1])
        ),
        "fresh_was_empty": bool(all(np.all(b == 0) for b in before)),
        "component_shape": list(saved["images"][0].shape),
    }


def group_moments(strategy):
    """Outputs and moving means of one training call for group sizes 0, 1, 2."""
    rng = np.random.default_rng(0)
    # Each replica's shard has its own mean and spread.
    x = np.concatenate(
        [rng.normal(3.0 * r, 1.0 + r, (2, 2, 2, 3)) for r in range(REPLICAS)]
    ).astype("float32")
    out = {"x": x.tolist()}
    for group in (0, 1, 2):
        with strategy.scope():
            layer = SplitBatchNormalization(group_size=group)
            layer.build((None, 2, 2, 3))
        dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))

        @tf.function
        def call(batch, layer=layer, grouped=True):
            return strategy.run(
                lambda b: layer(
                    b,
                    training=True,
                    bn_branch="main",
                    update_stats=False,
                    group_statistics=grouped,
                ),
                args=(batch,),
            )

        batch = next(iter(dataset))
        out[f"group{group}"] = np.concatenate(local(call(batch), strategy)).tolist()
        out[f"group{group}_local"] = np.concatenate(
            local(call(batch, grouped=False), strategy)
        ).tolist()
    return out


def attack_is_local(strategy):
    """The attack on replica r (model with BatchNorm groups of 2) vs one device on shard r."""
    images, labels = mt.fixed_batches(1, 8, seed=7)
    with strategy.scope():
        model = tiny_model(2)
    ctx = mt.make_context(model, batch_size=8, strategy=strategy)
    iterator = mt.batch_iterator(images, labels, strategy)

    @tf.function
    def attack(batch):
        return strategy.run(
            lambda b: steps_lib.run_attack(ctx, b[0], b[1], tf.constant(0, tf.int64)),
            args=(batch,),
        )

    distributed = np.concatenate(local(attack(next(iterator)), strategy))
    single = tiny_model()  # one device, its own batch statistics
    per_shard, grouped = [], []
    for r in range(REPLICAS):
        shard = slice(2 * r, 2 * r + 2)
        seed = tf.constant([ctx.seed, r], tf.int64)  # batch 0: index 0·replicas + r
        per_shard.append(
            attack_lib.pgd_attack(
                single, images[0][shard], labels[0][shard], ctx.attack, seed=seed
            ).numpy()
        )
    # What a grouped (communicating) attack would give instead: the pair's statistics.
    for pair in range(2):
        rows = slice(4 * pair, 4 * pair + 4)
        x = tf.constant(images[0][rows])
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = call_model(single, x, True, "aux", update_stats=False)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels[0][rows], logits)
            )
        grouped.append(np.sign(tape.gradient(loss, x).numpy()))
    return {
        "max_abs_diff": float(np.abs(distributed - np.concatenate(per_shard)).max()),
        "moved": float(np.abs(distributed - images[0]).max()),
        "grouped_sign_agreement_with_local": float(
            np.mean(np.sign(distributed - images[0]) == np.concatenate(grouped))
        ),
    }


def pairs_match_single_device(strategy):
    """Vanilla, 2 steps, 4 replicas in BatchNorm groups of 2 against one device that
    normalises each pair's 4 examples with their own moments (momentum SGD by hand).

    Tests the backward pass through the group's all_gather: the gradient of
    a pair's statistics reaches both replicas of the pair.
    """
    images, labels = mt.fixed_batches(2, 8, seed=9)
    lr, wd, momentum = 0.1, 1e-4, 0.9
    weights = {}
    for group in (2, 1):
        with strategy.scope():
            model = tiny_model(group)
        ctx = mt.make_context(
            model, batch_size=8, strategy=strategy, learning_rate=lr, weight_decay=wd
        )
        iterator = mt.batch_iterator(images, labels, strategy)
        run = mt.step_runner(ctx, "vanilla", strategy)
        for _ in range(2):
            run(iterator)
        weights[group] = [v.numpy() for v in model.trainable_variables]

    single = tiny_model()  # one device, its own batch statistics
    velocity = [np.zeros(v.shape, np.float32) for v in single.trainable_variables]
    for step in range(2):
        with tf.GradientTape() as tape:
            loss = 0.0
            for pair in range(2):
                rows = slice(4 * pair, 4 * pair + 4)
                logits = call_model(single, images[step][rows], True, "main", update_stats=False)
                loss += tf.reduce_sum(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels[step][rows], logits)
                )
            loss = loss / 8
        grads = tape.gradient(loss, single.trainable_variables)
        for i, (var, g) in enumerate(zip(single.trainable_variables, grads)):
            g = np.zeros(var.shape) if g is None else g.numpy()
            w = var.numpy()
            velocity[i] = momentum * velocity[i] + lr * (g + (wd * w if w.ndim > 1 else 0.0))
            var.assign(w - velocity[i])
    reference = [v.numpy() for v in single.trainable_variables]

    return {
        "pairs_vs_reference": max_relative_difference(weights[2], reference),
        "singles_vs_reference": max_relative_difference(weights[1], reference),
    }


def mixed_pass_with_groups(strategy):
    """DisAdv, 2 steps, BatchNorm groups of 2: one pass over [clean; adv] = two passes."""
    images, labels = mt.fixed_batches(2, 8, seed=13)
    weights = {}
    for update_pass in steps_lib.UPDATE_PASSES:
        with strategy.scope():
            model = tiny_model(2)
        ctx = mt.make_context(
            model, batch_size=8, strategy=strategy, update_pass=update_pass, label_smoothing=0.1
        )
        run = mt.step_runner(ctx, "disadv", strategy)
        iterator = mt.batch_iterator(images, labels, strategy)
        initial = mt.snapshot(model)
        for _ in range(2):
            run(iterator)
        weights[update_pass] = mt.snapshot(model)

    return {
        "concatenated_vs_separate": max_relative_difference(
            weights["concatenated"], weights["separate"]
        ),
        "moved": max_relative_difference(weights["separate"], initial),
    }


def main():
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    out = {"replicas": strategy.num_replicas_in_sync}
    out["ring"] = ring_round_trip(strategy)
    with tempfile.TemporaryDirectory() as model_dir:
        out["checkpoint"] = checkpoint_round_trip(strategy, model_dir)
    out["groups"] = group_moments(strategy)
    out["attack"] = attack_is_local(strategy)
    out["pairs"] = pairs_match_single_device(strategy)
    out["mixed"] = mixed_pass_with_groups(strategy)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
