"""``--mode=dry_run``: what the flags make of a run, without its data or accelerators.

Prints the global, per-replica and per-BatchNorm-group batch, accumulation,
steps per epoch and in total, the learning rate at the schedule's key
steps, the ConAdv ring buffer's bytes per replica and the model's parameter
count, then exits 0 — or stops with the one-line error a real run would
give. The replica count is ``--num_replicas`` when given (a TPU slice or a
cluster need not be reachable); otherwise the local strategy's. Dataset
sizes come from the source's nominal sizes (ImageNet's are known), or from
its metadata (``counts.json``, TFDS info) — never from its images.
"""

from __future__ import annotations

import functools
import math
import types

from conadv import ring_buffer
from conadv.run_config import RunConfig
from flags import validation
from official import group_moments, precision, resnet, schedules
from official.model_conversion import plain_model


def _replicas(run: RunConfig) -> tuple[int, str]:
    if run.flags["num_replicas"] is not None:
        return run.flags["num_replicas"], "--num_replicas"
    strategy_name = run.devices.distribution_strategy
    if strategy_name in ("tpu", "multi_worker_mirrored"):
        raise validation.FlagError(
            f"--mode=dry_run with --distribution_strategy={strategy_name} needs --num_replicas "
            "(the TPU cores of the slice, or workers x GPUs): it does not connect to devices"
        )
    strategy = run.devices.build_strategy()
    return strategy.num_replicas_in_sync, f"the local {strategy_name} strategy"


def _dataset_sizes(run: RunConfig) -> tuple[int, int, int, int]:
    """(image size, classes, training examples, evaluation examples)."""
    from input_pipeline import registry
    from input_pipeline.selection import Selection

    cls = registry.source_class(run.data.dataset)
    if cls.nominal_sizes is not None:
        classes, train, evaluation = cls.nominal_sizes
        selection = Selection.from_flags(
            run.data.pipeline.selection_examples, run.data.pipeline.selection_seed
        )
        if selection is not None:
            train -= selection.count(train)
        if run.data.train_examples is not None:
            train = min(train, run.data.train_examples)
        return (
            run.data.image_size or cls.default_image_size,
            run.data.num_classes or classes,
            train,
            evaluation,
        )
    source = run.data.build_source()  # reads metadata files only
    return (
        source.image_size,
        source.num_classes,
        source.num_train_examples,
        source.num_eval_examples,
    )


def _trainable_count(model) -> int:
    """Trainable weights (as ResNet-50's 25,557,032 are counted), not moving statistics."""
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


@functools.cache
def _parameter_counts(name: str, num_classes: int, width_multiplier: float, image_size: int):
    model = resnet.resnet(
        name, num_classes=num_classes, image_size=image_size, width_multiplier=width_multiplier
    )
    return _trainable_count(model), _trainable_count(plain_model(model))


def parameter_counts(name: str, num_classes: int, width_multiplier: float, image_size: int):
    """(trainable parameters with both BatchNorm branches, those of the exported model).

    Building a ResNet-50 takes seconds, and a sweep's dry runs ask for the
    same few models again and again, so each count is computed once.
    """
    return _parameter_counts(name, int(num_classes), float(width_multiplier), int(image_size))


def planned_length(run: RunConfig, train_examples: int) -> tuple[int, int, int]:
    """(steps per epoch, training steps, warmup steps) the run's flags imply."""
    train = run.train
    steps_per_epoch = max(1, train_examples // train.global_batch_size)
    total_steps = int(train.train_steps or max(1, round(train.train_epochs * steps_per_epoch)))
    warmup_steps = min(round(train.warmup_epochs * steps_per_epoch), total_steps)
    return steps_per_epoch, total_steps, warmup_steps


def check_warmup(run: RunConfig, steps_per_epoch: int, total_steps: int, what: str = "the run"):
    """A one-line ``FlagError`` if the warmup would last as long as ``what`` or longer: the
    learning rate would never reach its peak, and the decay never start."""
    warmup = run.train.warmup_epochs * steps_per_epoch
    if warmup >= total_steps > 0:
        raise validation.FlagError(
            f"--warmup_epochs={run.train.warmup_epochs:g} is {warmup:g} steps, not shorter than "
            f"{what}'s {total_steps}: train longer (--train_epochs), warm up less (in a "
            "sweep, the base --warmup_epochs), or scale the warmup less with the batch "
            "(--lr_scaling sqrt)"
        )


def training_set_size(run: RunConfig) -> int:
    """The training set's size, from the source's nominal sizes or its metadata."""
    return _dataset_sizes(run)[2]


def describe(run: RunConfig) -> dict:
    """Prints the run's configuration; returns it as a dict."""
    replicas, replicas_from = _replicas(run)
    image_size, num_classes, train_examples, eval_examples = _dataset_sizes(run)
    flags = types.SimpleNamespace(**run.flags)
    validation.validate_batch_sizes(flags, replicas)
    validation.validate_bn_group_size(flags, replicas)
    validation.validate_image_size(run.train.model, image_size)

    train = run.train
    accumulation = train.accumulation_steps
    per_replica = train.global_batch_size // replicas
    micro = per_replica // accumulation
    if train.bn_group_size is not None:
        group = group_moments.check_group_size(train.bn_group_size, replicas) or replicas
        group_reason = "--bn_group_size"
    else:
        group, group_reason = group_moments.default_group_size(micro, replicas)
        group = group or replicas  # 0: all replicas
    steps_per_epoch, total_steps, warmup_steps = planned_length(run, train_examples)
    check_warmup(run, steps_per_epoch, total_steps)
    schedule = schedules.from_config(train, steps_per_epoch, total_steps)
    key_steps = sorted(
        {0, warmup_steps, total_steps // 4, total_steps // 2, 3 * total_steps // 4, total_steps - 1}
    )
    learning_rates = {step: float(schedule(step)) for step in key_steps}
    ring_bytes = 0
    if train.method == "conadv":
        ring_bytes = ring_buffer.bytes_per_replica(
            train.staleness * accumulation,
            micro,
            image_size,
            precision.compute_dtype(train.precision),
            clean_images=train.attack_source == "separate",
        )
    parameters, inference_parameters = parameter_counts(
        train.model, num_classes, train.width_multiplier, image_size
    )

    result = {
        "replicas": replicas,
        "replicas_from": replicas_from,
        "global_batch": train.global_batch_size,
        "per_replica_batch": per_replica,
        "accumulation_steps": accumulation,
        "micro_batch_per_replica": micro,
        "bn_group_replicas": group,
        "bn_group_examples": group * micro,
        "bn_group_reason": group_reason,
        "image_size": image_size,
        "train_examples": train_examples,
        "eval_examples": eval_examples,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": total_steps,
        "warmup_steps": warmup_steps,
        "learning_rates": learning_rates,
        "ring_buffer_bytes_per_replica": ring_bytes,
        "parameters": parameters,
        "inference_parameters": inference_parameters,
        "precision": train.precision,
        "method": train.method,
    }
    lines = [
        f"dry run: {train.method} {train.model} on {run.data.dataset} "
        f"({image_size} px, {num_classes} classes), {train.precision}",
        f"replicas: {replicas} (from {replicas_from})",
        f"global batch: {train.global_batch_size} = {replicas} replicas x {per_replica} per "
        f"replica" + (f" = {accumulation} micro-batches of {micro}" if accumulation > 1 else ""),
        f"per replica: {per_replica} examples per step, {micro} per forward pass",
        f"BatchNorm group: {group} replica(s) x {micro} = {group * micro} examples "
        f"per statistic ({group_reason})",
        f"accumulation: {accumulation} micro-batch(es) per optimizer step",
        f"steps: {steps_per_epoch} per epoch ({train_examples} training examples), "
        f"{total_steps} in total, {warmup_steps} of warmup",
        "learning rate ("
        + train.lr_schedule
        + "): "
        + ", ".join(f"step {s}: {lr:.6g}" for s, lr in learning_rates.items()),
        f"ring buffer: {ring_bytes} bytes per replica"
        + (f" ({ring_bytes / 2**30:.2f} GiB)" if ring_bytes else " (no ring: not ConAdv)"),
        f"parameters: {parameters} trainable (both BatchNorm branches), "
        f"{inference_parameters} in the exported model",
    ]
    for line in lines:
        print(line, flush=True)
    return result
