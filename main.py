"""Train and evaluate ResNets with ConAdv, DisAdv or vanilla large-batch training.

With no flags this trains ConAdv on the embedded handwritten-digits set on
the CPU. For ImageNet see ``configs/`` (use ``--flagfile``) and BUILD.md.

    conadv-train --flagfile=configs/imagenet_resnet50_32k_conadv.cfg --data_dir=...
"""

from __future__ import annotations

import os
import sys

# TensorFlow's C++ INFO lines, unless the environment asks for them (see
# conadv/run_logging.py); must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, logging  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

from conadv import run_identity, run_logging  # noqa: E402

run_logging.import_tensorflow_quietly()

import flags as conadv_flags  # noqa: E402
from conadv.nonfinite import NonFiniteError  # noqa: E402
from conadv.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE  # noqa: E402
from conadv.preemption import PreemptedError  # noqa: E402
from conadv.trainer import CheckpointMismatchError  # noqa: E402
from flags.validation import FlagError  # noqa: E402
from input_pipeline.base import DataError, PipelineOptions, data_error_from  # noqa: E402

conadv_flags.define_all()
FLAGS = absl_flags.FLAGS


def _attack_config(values):
    from conadv.attack import AttackConfig

    return AttackConfig(
        eps=values.attack_eps,
        step_size=values.attack_step_size,
        num_steps=values.attack_steps,
        random_init=values.attack_init == "random",
        bn_branch=values.attack_bn,
        target=values.attack_target,
    )


def _eval_attack_config(values):
    """The robust-evaluation attack (main branch, moving statistics), or None."""
    from conadv.attack import AttackConfig

    if values.eval_attack_eps is None:
        return None
    return AttackConfig(
        eps=values.eval_attack_eps,
        step_size=values.eval_attack_step_size,
        num_steps=values.eval_attack_steps,
        random_init=True,
        bn_branch="main",
    )


def _train_config(values, strategy):
    import tensorflow as tf

    from conadv.trainer import TrainConfig

    on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    if values.jit_compile == "auto":
        jit = on_tpu
    else:
        jit = values.jit_compile == "true"
    update_pass = values.update_pass
    if update_pass == "auto":
        # One pass of 2B rows fills TPU and GPU matrix units better; on CPU the
        # two half-size passes measured faster (README, Step throughput).
        accelerated = on_tpu or bool(tf.config.list_logical_devices("GPU"))
        update_pass = "concatenated" if accelerated else "separate"
    return TrainConfig(
        model_dir=values.model_dir or run_identity.default_model_dir(values),
        method=values.method,
        staleness=values.staleness,
        model=values.model,
        width_multiplier=values.width_multiplier,
        bn_group_size=values.bn_group_size,
        precision=values.precision,
        update_pass=update_pass,
        global_batch_size=values.batch_size,
        eval_batch_size=values.eval_batch_size,
        train_steps=values.train_steps,
        train_epochs=values.train_epochs,
        steps_per_loop=values.steps_per_loop,
        epochs_between_evals=values.epochs_between_evals,
        checkpoint_steps=values.checkpoint_steps,
        optimizer=values.optimizer,
        learning_rate=values.learning_rate,
        warmup_epochs=values.warmup_epochs,
        lr_schedule=values.lr_schedule,
        poly_power=values.poly_power,
        end_learning_rate=values.end_learning_rate,
        weight_decay=values.weight_decay,
        momentum=values.momentum,
        label_smoothing=values.label_smoothing,
        lars_eta=values.lars_eta,
        attack=_attack_config(values),
        eval_attack=_eval_attack_config(values),
        jit_compile=jit,
        seed=values.seed,
        export_dir=values.export_dir,
    )


def _data_source(values):
    from input_pipeline import registry

    options = PipelineOptions(
        seed=values.seed,
        deterministic=values.deterministic,
        cache_eval=values.cache_eval,
        augment=values.augment,
        autoaugment_policy=values.autoaugment_policy,
        randaugment_layers=values.randaugment_layers,
        randaugment_magnitude=values.randaugment_magnitude,
        skip_corrupt_records=values.skip_corrupt_records,
        tf_data_service=values.tf_data_service,
    )
    extra = {}
    if values.dataset == "imagenet":
        extra["one_based_labels"] = values.one_based_labels
    if values.dataset.startswith("tfds:"):
        extra["tfds_download"] = values.tfds_download
    return registry.get_source(
        values.dataset,
        image_size=values.image_size,
        data_dir=values.data_dir,
        num_classes=values.num_classes,
        options=options,
        **extra,
    )


def run_main(values) -> dict | None:
    """Runs the job the flags describe; returns the summary (train) or eval result."""
    from official import distribute

    conadv_flags.validation.validate(values)  # everything but the replica count
    distribute.configure_cpu_devices(values.num_cpu_devices)
    try:
        strategy = distribute.get_strategy(
            values.distribution_strategy, values.num_cpu_devices, values.tpu
        )
    except distribute.StrategyError as error:
        raise FlagError(
            f"--distribution_strategy={values.distribution_strategy}: {error}"
        ) from None
    conadv_flags.validation.validate_batch_sizes(values, strategy.num_replicas_in_sync)
    conadv_flags.validation.validate_bn_group_size(values, strategy.num_replicas_in_sync)
    source = _data_source(values)
    conadv_flags.validation.validate_image_size(values.model, source.image_size)

    from conadv.trainer import Trainer, write_json

    config = _train_config(values, strategy)
    os.makedirs(config.model_dir, exist_ok=True)
    run_identity.check_or_record(config.model_dir, values)
    log_file = run_logging.add_log_file(config.model_dir)
    logging.info("Full log in %s", log_file)
    trainer = Trainer(config, strategy, source)
    if values.mode in ("eval", "export"):
        if not trainer.has_checkpoint():
            raise FlagError(
                f"--mode={values.mode}: no checkpoint in --model_dir={config.model_dir}; "
                "train first"
            )
        trainer.restore()
    if values.mode == "eval":
        result = trainer.evaluate()
        result["global_step"] = trainer.global_step
        write_json(os.path.join(config.model_dir, "eval.json"), result)
        trainer.log_evaluation(trainer.global_step, result)
        if values.eval_predictions:
            write_json(
                os.path.join(config.model_dir, "predictions.json"),
                {"global_step": trainer.global_step, "top_k_ids": trainer.predict()},
            )
        return result
    if values.mode == "export":
        exported = trainer.export()
        print(
            f"exported step {trainer.global_step}: {exported['keras']} and "
            f"{exported['saved_model']}",
            flush=True,
        )
        return exported

    summary = trainer.train(evaluate=values.mode == "train_and_eval")
    exported = trainer.export()
    summary["export_path"] = exported["keras"]
    summary["saved_model_path"] = exported["saved_model"]
    write_json(os.path.join(config.model_dir, "summary.json"), summary)
    if summary["eval_top1"] is not None:
        print(
            f"done: eval top1 {summary['eval_top1']:.4f} (train top1 {summary['train_top1']:.4f})"
            f" in {summary['wall_time_s']:.0f} s; summary in {config.model_dir}/summary.json",
            flush=True,
        )
    return summary


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {' '.join(argv[1:])!r}: every option is a --flag")
    run_logging.configure_console()
    try:
        run_main(FLAGS)
    except (FlagError, DataError, CheckpointMismatchError, run_identity.RunMismatchError) as error:
        _fail(str(error))
    except NonFiniteError as error:
        _fail(str(error), exit_code=3)
    except PreemptedError as error:
        print(str(error), file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as error:
        # A failed in-graph data check (corrupt image, label out of range)
        # surfaces as a TensorFlow error; report the record it names.
        data_error = data_error_from(error)
        if data_error is None:
            raise
        _fail(str(data_error))


def _fail(message: str, exit_code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def run():
    """Console script ``conadv-train``."""
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    run()
