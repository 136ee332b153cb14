"""Runs the three methods under MirroredStrategy on 2 logical CPU devices; prints JSON.

A separate process, because logical devices must be configured before
TensorFlow initialises its devices (tests/test_mirrored.py starts it).
"""

import json

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import keras  # noqa: E402

from conadv import steps as steps_lib  # noqa: E402
from official import optimizers, precision, resnet  # noqa: E402
from official.split_batch_norm import SplitBatchNormalization  # noqa: E402
from tests import method_testing as mt  # noqa: E402

BATCH = 8


def model_for(strategy, synchronized):
    with strategy.scope():
        return resnet.resnet(
            "resnet20",
            num_classes=mt.NUM_CLASSES,
            image_size=mt.IMAGE_SIZE,
            width_multiplier=0.5,
            bn_group_size=0 if synchronized else 1,
            seed=2,
        )


def train(strategy, method, images, labels, steps, synchronized=True, accumulation=1, frozen=False):
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
    for _ in range(steps):
        run(iterator)
    return model, ctx


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


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    images, labels = mt.fixed_batches(5, BATCH, seed=3)
    out = {"replicas": mirrored.num_replicas_in_sync, "methods": {}}

    for method in ("vanilla", "disadv", "conadv"):
        model, ctx = train(mirrored, method, images, labels, steps=2)
        finite = all(np.all(np.isfinite(v.numpy())) for v in model.variables)
        out["methods"][method] = {
            "steps": int(ctx.optimizer.iterations.numpy()),
            "finite": bool(finite),
            "examples": ctx.sums.totals()["examples"],
        }
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

    sync_model, _ = train(mirrored, "vanilla", images, labels, steps=3, synchronized=True)
    ref_model, _ = train(single, "vanilla", images, labels, steps=3, synchronized=False)
    local_model, _ = train(mirrored, "vanilla", images, labels, steps=3, synchronized=False)

    def max_rel_diff(a, b):
        worst = 0.0
        for x, y in zip(a.variables, b.variables):
            x, y = x.numpy(), y.numpy()
            worst = max(worst, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-6)))
        return worst

    out["sync_vs_single_max_rel_diff"] = max_rel_diff(sync_model, ref_model)
    out["unsync_vs_single_max_rel_diff"] = max_rel_diff(local_model, ref_model)
    out["overflow"] = {
        "ours": overflow_on_one_replica(mirrored, precision.LossScaleOptimizer),
        "keras": overflow_on_one_replica(mirrored, keras.optimizers.LossScaleOptimizer),
    }
    # Gradient accumulation on 2 replicas: N = 2 micro-batches per step.
    frozen_one, _ = train(mirrored, "vanilla", images, labels, steps=2, frozen=True)
    frozen_two, _ = train(mirrored, "vanilla", images, labels, steps=2, frozen=True, accumulation=2)
    out["accumulation_frozen_max_rel_diff"] = max_rel_diff(frozen_two, frozen_one)
    model, ctx = train(mirrored, "conadv", images, labels, steps=2, accumulation=2)
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
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
