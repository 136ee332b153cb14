"""Start-up checks of flag values: one line naming the flag and how to fix it.

Checks run before any model or dataset is built, so a typo costs a second,
not a compiled graph. ``validate`` needs the number of replicas (batch sizes
must divide evenly); the image-size check needs the dataset's default size,
so ``main.py`` calls ``validate_image_size`` once the source is known.
"""

from __future__ import annotations

import os

from absl import flags as absl_flags


class FlagError(ValueError):
    """A bad flag value or combination; the message is one line."""


def _require(condition: bool, message: str):
    if not condition:
        raise FlagError(message)


#: The attack the free attack (--attack_source=clean_pass) computes, and the defaults
#: of those flags, which it replaces.
CLEAN_PASS_ATTACK = {
    "attack_steps": (1, 1),
    "attack_init": ("zero", "random"),
    "attack_bn": ("main", "aux"),
    "attack_target": ("untargeted", "untargeted"),
}


def settle_attack_source(values):
    """``--attack_source=clean_pass`` is a 1-step untargeted attack from the clean image
    through the main BatchNorm: sets the attack flags left at their defaults to it, and
    refuses one given otherwise (absl FLAGS know what was given; for other objects a
    value other than the default counts as given)."""
    if getattr(values, "attack_source", "separate") != "clean_pass":
        return
    _require(
        getattr(values, "method", None) != "vanilla",
        "--attack_source=clean_pass has no meaning for --method=vanilla (it makes no "
        "adversarial examples): drop --attack_source",
    )
    for name, (needed, default) in CLEAN_PASS_ATTACK.items():
        value = getattr(values, name)
        if value == needed:
            continue
        if isinstance(values, absl_flags.FlagValues):
            given = bool(values[name].present)
        else:
            given = value != default
        _require(
            not given,
            f"--attack_source=clean_pass is a 1-step untargeted attack from the clean image "
            f"through the main BatchNorm, not --{name}={value}: drop --{name} "
            "(or use --attack_source=separate)",
        )
        setattr(values, name, needed)


def distinct_numbers(flag: str, values, kind=int, positive: bool = True) -> list:
    """A list flag's values as numbers of ``kind``, each listed once (and positive
    unless ``positive`` is False), in the order given."""
    out = []
    for text in values:
        try:
            value = kind(text)
        except ValueError:
            raise FlagError(f"--{flag}: {text!r} is not a number of type {kind.__name__}") from None
        _require(not positive or value > 0, f"--{flag}: {text} must be positive")
        _require(value not in out, f"--{flag}: {text} is listed twice")
        out.append(value)
    return out


def validate_image_size(model: str, image_size: int):
    from official import resnet

    smallest = resnet.min_image_size(model)
    _require(
        image_size >= smallest,
        f"--image_size={image_size} is too small for --model={model}; use at least {smallest}",
    )


def validate_batch_sizes(values, num_replicas: int):
    """Batch sizes must split evenly over the replicas (static per-replica shapes),
    and the training batch also over the accumulated micro-batches."""
    accumulation = getattr(values, "accumulation_steps", 1)
    _require(accumulation >= 1, f"--accumulation_steps={accumulation} must be at least 1")
    for flag, parts in (
        ("batch_size", num_replicas * accumulation),
        ("eval_batch_size", num_replicas),
    ):
        size = getattr(values, flag)
        _require(size >= 1, f"--{flag}={size} must be positive")
        if parts == num_replicas:
            what = f"the {num_replicas} replicas"
        else:
            what = f"{num_replicas} replicas x --accumulation_steps={accumulation}"
        _require(
            size % parts == 0,
            f"--{flag}={size} is not divisible by {what}; use a multiple of {parts}",
        )


def validate_bn_group_size(values, num_replicas: int):
    """A BatchNorm group must tile the replicas."""
    group = values.bn_group_size
    if group is not None and group > 0:
        _require(
            num_replicas % group == 0,
            f"--bn_group_size={group} does not divide the {num_replicas} replicas; "
            "use a divisor of the replica count, or 0 for all replicas",
        )


def validate_sharpness(v):
    """The ``--sharpness_*`` settings of ``--mode sharpness`` (and a sweep's ``--sharpness``)."""
    for name, least in (
        ("sharpness_examples", 1),
        ("sharpness_iterations", 1),
        ("sharpness_steps", 0),
    ):
        value = getattr(v, name)
        _require(value >= least, f"--{name}={value} must be at least {least}")
    for name in ("sharpness_tolerance", "sharpness_eps"):
        value = getattr(v, name)
        _require(value > 0, f"--{name}={value} must be > 0")


def validate_selection(v):
    """``--selection_examples``: a count, a fraction below 1, or 0; on fixed examples."""
    amount = v.selection_examples
    _require(
        amount >= 0 and (amount < 1 or float(amount).is_integer()),
        f"--selection_examples={amount:g} must be a count (1, 2, ...), a fraction in (0, 1), "
        "or 0 for none",
    )
    _require(
        bool(amount) or not v.selection_seed,
        f"--selection_seed={v.selection_seed} picks the part --selection_examples holds "
        "out; give --selection_examples too (or drop --selection_seed)",
    )
    _require(
        not amount or v.dataset != "synthetic",
        "--selection_examples: --dataset=synthetic has no fixed training examples to hold out",
    )


def validate(values, num_replicas: int = 1):
    """Raises ``FlagError`` for the first bad value in ``values`` (absl FLAGS or alike)."""
    from input_pipeline import registry
    from input_pipeline.base import DataError
    from official import resnet

    v = values
    settle_attack_source(v)
    validate_batch_sizes(v, num_replicas)
    _require(
        v.model in resnet.MODEL_NAMES,
        f"--model={v.model} is unknown; choose one of {', '.join(resnet.MODEL_NAMES)}",
    )
    try:
        registry.check_dataset_name(v.dataset)
    except DataError as error:
        raise FlagError(str(error)) from None
    if v.dataset in registry.NEEDS_DATA_DIR:
        _require(bool(v.data_dir), f"--dataset={v.dataset} reads files: set --data_dir")
    if v.data_dir and v.mode != "dry_run":  # a dry run reads no data
        _require(
            os.path.isdir(v.data_dir),
            f"--data_dir={v.data_dir} does not exist or is not a directory",
        )
    if v.image_size is not None:
        _require(v.image_size > 0, f"--image_size={v.image_size} must be positive")
        validate_image_size(v.model, v.image_size)
    if v.num_classes is not None:
        _require(v.num_classes >= 2, f"--num_classes={v.num_classes} must be at least 2")
    if v.train_examples is not None:
        _require(
            v.dataset == "digits",
            f"--train_examples is for --dataset=digits (in memory), not {v.dataset}",
        )
        _require(
            v.train_examples >= 10,
            f"--train_examples={v.train_examples} must be at least 10 (one per class)",
        )
    validate_selection(v)
    _require(v.width_multiplier > 0, f"--width_multiplier={v.width_multiplier} must be > 0")
    validate_sharpness(v)

    _require(
        0 <= v.attack_eps <= 255,
        f"--attack_eps={v.attack_eps} must be in [0, 255] (pixel units)",
    )
    if v.attack_step_size is not None:
        _require(v.attack_step_size > 0, f"--attack_step_size={v.attack_step_size} must be > 0")
    _require(v.attack_steps >= 1, f"--attack_steps={v.attack_steps} must be at least 1")
    if v.eval_attack_eps is not None:
        _require(
            0 <= v.eval_attack_eps <= 255,
            f"--eval_attack_eps={v.eval_attack_eps} must be in [0, 255] (pixel units)",
        )
    _require(
        v.eval_attack_steps >= 1, f"--eval_attack_steps={v.eval_attack_steps} must be at least 1"
    )
    if v.eval_attack_step_size is not None:
        _require(
            v.eval_attack_step_size > 0,
            f"--eval_attack_step_size={v.eval_attack_step_size} must be > 0",
        )
    if v.method == "conadv":
        _require(
            v.staleness >= 1,
            f"--staleness={v.staleness}: ConAdv attacks with weights at least 1 step old; "
            "use --staleness>=1 (or --method=disadv for fresh weights)",
        )

    if v.train_steps is not None:
        _require(v.train_steps >= 1, f"--train_steps={v.train_steps} must be at least 1")
    _require(v.train_epochs > 0, f"--train_epochs={v.train_epochs} must be > 0")
    _require(v.steps_per_loop >= 1, f"--steps_per_loop={v.steps_per_loop} must be at least 1")
    _require(
        v.epochs_between_evals > 0,
        f"--epochs_between_evals={v.epochs_between_evals} must be > 0",
    )
    _require(v.checkpoint_steps >= 0, f"--checkpoint_steps={v.checkpoint_steps} must be >= 0")
    _require(v.learning_rate >= 0, f"--learning_rate={v.learning_rate} must be >= 0")
    _require(v.end_learning_rate >= 0, f"--end_learning_rate={v.end_learning_rate} must be >= 0")
    _require(v.warmup_epochs >= 0, f"--warmup_epochs={v.warmup_epochs} must be >= 0")
    _require(v.weight_decay >= 0, f"--weight_decay={v.weight_decay} must be >= 0")
    _require(0 <= v.momentum < 1, f"--momentum={v.momentum} must be in [0, 1)")
    _require(0 <= v.label_smoothing < 1, f"--label_smoothing={v.label_smoothing} must be in [0, 1)")
    _require(v.lars_eta > 0, f"--lars_eta={v.lars_eta} must be > 0")
    _require(v.poly_power > 0, f"--poly_power={v.poly_power} must be > 0")
    _require(0 <= v.bn_momentum < 1, f"--bn_momentum={v.bn_momentum} must be in [0, 1)")
    _require(
        v.precise_bn_batches >= 0,
        f"--precise_bn_batches={v.precise_bn_batches} must be >= 0 (0 turns precise BatchNorm off)",
    )
    if v.bn_group_size is not None:
        _require(
            v.bn_group_size >= 0,
            f"--bn_group_size={v.bn_group_size} must be >= 0 "
            "(0 = all replicas, 1 = each replica's own)",
        )
    _require(
        v.distribution_strategy != "multi_worker_mirrored"
        or bool(v.model_dir)
        or v.mode == "dry_run",
        "--distribution_strategy=multi_worker_mirrored needs --model_dir: a directory every "
        "worker shares (the default is under each host's own temporary directory)",
    )
    if v.num_replicas is not None:
        _require(v.num_replicas >= 1, f"--num_replicas={v.num_replicas} must be at least 1")
    _require(v.num_cpu_devices >= 1, f"--num_cpu_devices={v.num_cpu_devices} must be at least 1")
    for name in ("peer_timeout", "cluster_start_timeout"):
        _require(getattr(v, name) > 0, f"--{name}={getattr(v, name)} must be > 0 (seconds)")
    validate_data_service(v)
    _require(
        v.augment == "none" or v.dataset != "synthetic",
        f"--augment={v.augment} has no meaning for --dataset=synthetic (random pixels); "
        "use --augment=none",
    )
    _require(
        0 < v.target_accuracy <= 1,
        f"--target_accuracy={v.target_accuracy} must be a fraction in (0, 1] (0.759, not 75.9)",
    )
    if v.mlperf_log:
        try:
            import mlperf_logging  # noqa: F401
        except ImportError:
            raise FlagError(
                f"--mlperf_log={v.mlperf_log} needs the mlperf-logging package: "
                "pip install 'conadv[mlperf]'"
            ) from None
        _require(
            os.path.isdir(os.path.dirname(os.path.abspath(v.mlperf_log))),
            f"--mlperf_log={v.mlperf_log}: its directory does not exist",
        )
    _require(v.randaugment_layers >= 0, f"--randaugment_layers={v.randaugment_layers} must be >= 0")
    _require(
        0 <= v.randaugment_magnitude <= 30,
        f"--randaugment_magnitude={v.randaugment_magnitude} must be in [0, 30]",
    )


def validate_data_service(v):
    """``--tf_data_service`` reads record files on the service's workers; how many."""
    from input_pipeline import registry

    workers = v.tf_data_service_workers
    _require(
        workers >= 0,
        f"--tf_data_service_workers={workers} must be >= 0 (0: the dispatcher's own count)",
    )
    if not v.tf_data_service:
        _require(
            workers == 1,
            f"--tf_data_service_workers={workers} needs --tf_data_service=grpc://HOST:PORT",
        )
        return
    _require(
        v.tf_data_service.startswith("grpc://"),
        f"--tf_data_service={v.tf_data_service} must be a dispatcher's grpc://HOST:PORT",
    )
    _require(
        registry.reads_records(v.dataset),
        f"--tf_data_service moves record decoding to the service; --dataset={v.dataset} "
        "has no records to read (use imagenet, folder or tfds:NAME, or leave it out)",
    )


def validate_replica_count(values, num_replicas: int):
    """``--num_replicas``, when given, must be what the strategy has."""
    expected = values.num_replicas
    _require(
        expected is None or expected == num_replicas,
        f"--num_replicas={expected} but --distribution_strategy={values.distribution_strategy} "
        f"has {num_replicas} replicas; use the configuration made for these devices or change "
        "--num_replicas (and the batch sizes it implies)",
    )
