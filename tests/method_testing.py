"""Small real models and fixed batches shared by the method's tests (no mocks)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.ring_buffer import RingBuffer
from conadv.run.metrics import ReplicaSums
from official import optimizers, precision, resnet
from official.accumulation import GradientAccumulator

IMAGE_SIZE = 16
NUM_CLASSES = 10


def fixed_batches(num_batches: int, batch_size: int, seed: int = 0):
    """Images with a learnable class signal (a class-dependent bright patch) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=(num_batches, batch_size)).astype(np.int32)
    images = rng.uniform(0, 120, size=(num_batches, batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
    for b in range(num_batches):
        for i in range(batch_size):
            row = labels[b, i]
            images[b, i, row : row + 4, 2:12, :] += 120.0
    return images.astype(np.float32), labels


def batch_iterator(images, labels, strategy=None):
    """An iterator over the given per-step batches, as a training loop sees them."""
    strategy = strategy or tf.distribute.get_strategy()
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return iter(strategy.experimental_distribute_dataset(ds))


def small_model(seed: int = 1, width: float = 0.5, dtype_policy: str = precision.FLOAT32):
    return resnet.resnet(
        "resnet8",
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        width_multiplier=width,
        seed=seed,
        dtype_policy=dtype_policy,
    )


def make_context(
    model,
    learning_rate=0.1,
    optimizer="momentum",
    weight_decay=0.0,
    staleness=None,
    batch_size=8,
    attack=None,
    label_smoothing=0.0,
    strategy=None,
    update_pass=steps_lib.CONCATENATED,
    accumulation_steps=1,
    dtype_policy=precision.FLOAT32,
    attack_source=steps_lib.SEPARATE_ATTACK,
):
    """A step context like the trainer's, with its ring buffer if ``staleness``
    (τ·N micro-batch slots under ``accumulation_steps`` N); under
    ``mixed_float16`` the optimizer scales the loss, as the trainer's does."""
    strategy = strategy or tf.distribute.get_strategy()
    compute_dtype = precision.compute_dtype(dtype_policy)
    with strategy.scope():
        opt = optimizers.build_optimizer(
            optimizer, learning_rate=learning_rate, momentum=0.9, weight_decay=weight_decay
        )
        if precision.needs_loss_scaling(dtype_policy):
            opt = precision.LossScaleOptimizer(opt)
        opt.build(model.trainable_variables)
        sums = ReplicaSums(steps_lib.TRAIN_SUMS)
    accumulator = None
    if accumulation_steps > 1:
        accumulator = GradientAccumulator(
            strategy, model.trainable_variables, scalars=("clean", "adversarial")
        )
    ring = None
    if staleness:
        micro = batch_size // strategy.num_replicas_in_sync // accumulation_steps
        ring = RingBuffer(
            strategy,
            staleness * accumulation_steps,
            micro,
            IMAGE_SIZE,
            dtype=compute_dtype,
            clean_images=attack_source == steps_lib.SEPARATE_ATTACK,
        )
    return steps_lib.StepContext(
        model=model,
        optimizer=opt,
        global_batch_size=batch_size,
        num_classes=NUM_CLASSES,
        label_smoothing=label_smoothing,
        attack=attack or attack_lib.AttackConfig(eps=8.0),
        seed=3,
        sums=sums,
        ring=ring,
        update_pass=update_pass,
        accumulation_steps=accumulation_steps,
        accumulator=accumulator,
        compute_dtype=compute_dtype,
        attack_source=attack_source,
    )


def step_runner(ctx, method, strategy=None, jit_compile=False):
    """Runs one training step of ``method`` per call, like the trainer's loop does."""
    strategy = strategy or tf.distribute.get_strategy()
    train_step = steps_lib.TrainStep(method, ctx, strategy, jit_compile=jit_compile)

    @tf.function
    def run(iterator):
        train_step(iterator)

    return run


def fill_ring(ctx, iterator, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    prologue = steps_lib.build_conadv_prologue(ctx)

    @tf.function
    def fill(it, index):
        strategy.run(prologue, args=(next(it), index))

    for index in range(ctx.ring.staleness):  # τ·N micro-batches (N = 1: τ batches)
        fill(iterator, tf.constant(index, tf.int64))
    ctx.ring.mark_filled()


def snapshot(model):
    return [v.numpy().copy() for v in model.variables]


def trainable_snapshot(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def update_error(initial, got, want) -> float:
    """‖Δgot − Δwant‖ / ‖Δwant‖ over all the variables together, Δ = after − initial.

    About 0 when two runs took the same steps, 1 when ``got`` skipped them,
    about 1 for a doubled step; infinite if ``want`` did not move while
    ``got`` did. Deltas, not weights: a step is small next to the weights it
    changes. One norm over all variables, not a maximum per variable: an
    update below a weight's float32 resolution (γ = 1 plus 1e-9) rounds away
    or not, and 16-bit rounding in a few tiny updates would dominate. Compare
    trainable variables: BatchNorm's moving statistics move without any update.
    """
    error = np.sqrt(sum(np.sum(np.square(a - b, dtype=np.float64)) for a, b in zip(got, want)))
    scale = np.sqrt(
        sum(np.sum(np.square(b - start, dtype=np.float64)) for start, b in zip(initial, want))
    )
    if error == 0.0:
        return 0.0
    return float(error / scale) if scale > 0.0 else float("inf")


def restore(model, values):
    for var, value in zip(model.variables, values):
        var.assign(value)


def attack_in_replica(ctx, images, labels, batch_index):
    """``steps.run_attack`` as the steps call it, from outside a replica function."""

    @tf.function
    def fn():
        return tf.distribute.get_strategy().run(
            steps_lib.run_attack, args=(ctx, images, labels, tf.constant(batch_index, tf.int64))
        )

    return fn().numpy()


def small_trainer(model_dir, strategy=None, num_classes=NUM_CLASSES, source=None, **overrides):
    """A real ``Trainer`` with a tiny ResNet-8, on synthetic 16-px data (one batch,
    repeated) unless another ``source`` is given."""
    from conadv.trainer import TrainConfig, Trainer
    from input_pipeline.base import PipelineOptions
    from input_pipeline.synthetic import SyntheticSource

    source = source or SyntheticSource(
        image_size=IMAGE_SIZE,
        options=PipelineOptions(seed=5),
        num_classes=num_classes,
        num_train_examples=64,
        num_eval_examples=32,
    )
    settings = dict(
        model_dir=model_dir,
        model="resnet8",
        width_multiplier=0.25,
        global_batch_size=8,
        eval_batch_size=16,
        train_steps=3,
        steps_per_loop=3,
        optimizer="momentum",
        learning_rate=0.1,
        warmup_epochs=0.0,
        lr_schedule="cosine",
        attack=attack_lib.AttackConfig(eps=8.0),
        seed=3,
    )
    settings.update(overrides)
    return Trainer(TrainConfig(**settings), strategy or tf.distribute.get_strategy(), source)
