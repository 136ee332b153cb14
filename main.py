"""Train and evaluate ResNets with ConAdv, DisAdv or vanilla large-batch training.

With no flags this trains ConAdv on the embedded handwritten-digits set on
the CPU. For ImageNet see ``configs/`` (use ``--flagfile``) and BUILD.md.

    conadv-train --flagfile=configs/imagenet_resnet50_32k_conadv.cfg --data_dir=...
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

#: The program's start, for the MLPerf log's init phase (--mlperf_log).
START_MS = int(time.time() * 1000)

# TensorFlow's C++ INFO lines, unless the environment asks for them (see
# conadv/run/run_logging.py); must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, logging  # noqa: E402
from absl import flags as absl_flags  # noqa: E402

from conadv.run import run_identity, run_logging  # noqa: E402

run_logging.import_tensorflow_quietly()

import flags as conadv_flags  # noqa: E402
from conadv.run.checkpoints import CheckpointMismatchError  # noqa: E402
from conadv.run.cluster import EXIT_CODE as CLUSTER_EXIT_CODE  # noqa: E402
from conadv.run.cluster import ClusterError  # noqa: E402
from conadv.run.nonfinite import NonFiniteError  # noqa: E402
from conadv.run.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE  # noqa: E402
from conadv.run.preemption import PreemptedError  # noqa: E402
from flags.validation import FlagError  # noqa: E402
from input_pipeline.base import DataError, data_error_from  # noqa: E402

conadv_flags.define_all()
FLAGS = absl_flags.FLAGS


def run_main(values) -> dict | None:
    """Runs the job the flags describe; returns the summary (train) or eval result."""
    from conadv.run_config import RunConfig

    # eval, export and sharpness on a trained run: the flags not given are the run's.
    run_identity.fill_from_record(values)
    run = RunConfig.from_flags(values)  # every flag read and checked here, once
    if run.mode == "dry_run":
        from conadv.studies import dry_run

        return dry_run.describe(run)
    if run.mode in run_identity.READING_MODES:
        _require_checkpoint(run)  # before anything is written to --model_dir
    if run.devices.distribution_strategy == "multi_worker_mirrored":
        # TensorFlow's C++ pages (a lost worker's) go to this worker's log.txt, from the start.
        from conadv.run.run_files import planned_private_dir

        private = planned_private_dir(run.model_dir, os.environ.get("TF_CONFIG", ""))
        if private is not None:  # else the strategy refuses TF_CONFIG in one line
            run_logging.native_stderr_to(private)
    strategy = run.devices.build_strategy()

    from conadv.run import cluster, run_files

    files = run_files.RunFiles(run.model_dir, strategy)
    # A worker lost (or unreachable) in any mode stops this one in one line.
    with cluster.PeerWatch(strategy, run.model_dir, files.multi_worker) as watch:
        return _run_mode(run, values, strategy, files, watch)


def _run_mode(run, values, strategy, files, watch) -> dict | None:
    """``run_main`` once the strategy exists: the data, the trainer and the mode's work."""
    import tensorflow as tf

    from conadv.run import input_mode
    from conadv.run.run_files import write_json
    from conadv.trainer import Trainer

    run, registered = input_mode.settle(run)  # the service's worker count (fast mode)
    source = run.data.build_source()
    run = run.for_strategy(strategy, source.image_size).with_data(source)
    tf.io.gfile.makedirs(run.model_dir)
    run_identity.check_or_record(run, record=files.is_chief)
    if run.mode == "sharpness":
        # Measured in float32 whatever the training precision (the variables are float32).
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, precision="float32"))
    log_file = run_logging.add_log_file(files.private_dir())
    logging.info("Full log in %s", log_file)
    trainer = Trainer(run.train, strategy, source, files=files)
    watch.step = lambda: trainer.host_step
    if files.is_chief and run.mode in ("train", "train_and_eval"):
        # A new --train_steps/--train_epochs re-plans the decay: said and recorded.
        run_identity.check_schedule(run, trainer.steps_per_epoch, trainer.train_steps)
        input_mode.say_and_record(run, registered)  # the service's mode and its trade-off
    if run.mode in ("eval", "export", "sharpness"):  # a checkpoint is there (checked above)
        # Sharpness is measured in float32: a float16 run's loss-scaled optimizer
        # state does not fit the float32 optimizer, and the measurement needs none.
        trainer.restore(weights_only=run.mode == "sharpness")
    if run.mode == "eval":
        result = trainer.evaluator.evaluate()
        result["global_step"] = trainer.global_step
        from conadv import evaluation

        result.update(evaluation.selection_evaluation(trainer.evaluator))
        if files.is_chief:
            write_json(os.path.join(run.model_dir, "eval.json"), result)
        trainer.summaries.log_evaluation(trainer.global_step, result)
        if run.eval_predictions and files.is_chief:
            write_json(
                os.path.join(run.model_dir, "predictions.json"),
                {"global_step": trainer.global_step, "top_k_ids": trainer.evaluator.predict()},
            )
        _finish(trainer, files, log_file)
        return result
    if run.mode == "sharpness":
        from conadv.studies import sharpness

        result = sharpness.measure_run(trainer, values)
        if files.is_chief:
            from flags import sharpness as sharpness_flags

            # One file per setting (a sweep with other settings adds its own), and the
            # latest as sharpness.json.
            named = sharpness_flags.measurement_name(result["settings"])
            tf.io.gfile.makedirs(os.path.join(run.model_dir, sharpness_flags.MEASUREMENTS_DIR))
            write_json(os.path.join(run.model_dir, named), result)
            write_json(os.path.join(run.model_dir, "sharpness.json"), result)
        print(
            f"sharpness at step {result['global_step']}: top Hessian eigenvalue "
            f"{result['top_eigenvalue']:.4g} ({result['power_iterations']} iterations), "
            f"ε-sharpness {result['eps_sharpness']:.4g} (ε={result['epsilon']:g}), training loss "
            f"{result['loss']:.4f} over {result['examples']} images",
            flush=True,
        )
        _finish(trainer, files, log_file)
        return result
    if run.mode == "export":
        trainer.evaluator.precise_statistics()  # every worker: its sums are all-reduced
        if not files.is_chief:
            _finish(trainer, files, log_file)
            return {}  # the chief exports
        exported = trainer.evaluator.export()
        print(
            f"exported step {trainer.global_step}: {exported['keras']} and "
            f"{exported['saved_model']}",
            flush=True,
        )
        _finish(trainer, files, log_file)
        return exported

    mlperf = None
    if run.mlperf_log:
        from conadv.run import mlperf_log

        mlperf = mlperf_log.MLPerfLog(
            run, strategy, source, trainer, init_start_ms=START_MS, enabled=files.is_chief
        )
    try:
        summary = trainer.train(evaluate=run.mode == "train_and_eval", events=mlperf)
    except NonFiniteError as error:
        if files.is_chief:  # "diverged" is this run's result (a sweep's runner reads it)
            from conadv.run.nonfinite import record_divergence

            try:
                record_divergence(run.model_dir, error)
            except OSError as write_error:  # the divergence is still the error said
                logging.warning("could not write diverged.json: %s", write_error)
        raise
    trainer.evaluator.precise_statistics()  # every worker, for the chief's export
    if not files.is_chief:
        _finish(trainer, files, log_file)
        return summary  # the export and summary.json are the chief's (no collectives)
    exported = trainer.evaluator.export()
    summary["export_path"] = exported["keras"]
    summary["saved_model_path"] = exported["saved_model"]
    write_json(os.path.join(run.model_dir, "summary.json"), summary)
    _finish(trainer, files, log_file)
    if summary["eval_top1"] is not None:
        print(
            f"done: eval top1 {summary['eval_top1']:.4f} (train top1 {summary['train_top1']:.4f}"
            + (
                f", selection top1 {summary['selection_top1']:.4f}"
                if summary.get("selection_top1") is not None
                else ""
            )
            + f") in {summary['wall_time_s']:.0f} s; summary in {run.model_dir}/summary.json",
            flush=True,
        )
    return summary


def _require_checkpoint(run):
    """Refuses eval, export and sharpness on a --model_dir without a checkpoint.

    Checked before anything is created there: the directory stays as it was (a
    run_config.json left behind would refuse a later training with other flags).
    """
    import tensorflow as tf

    if tf.train.latest_checkpoint(run.model_dir) is not None:
        return
    missing = "" if tf.io.gfile.isdir(run.model_dir) else " (the directory does not exist)"
    raise FlagError(
        f"--mode={run.mode}: no checkpoint in --model_dir={run.model_dir}{missing}; "
        "train there first (--mode=train), or give the --model_dir of a trained run"
    )


def _finish(trainer, files, log_file):
    """A finished worker closes what it writes; a non-chief then removes its directory."""
    trainer.close()
    if not files.is_chief:
        run_logging.remove_log_file(log_file)
        files.clean_up()


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
    except ClusterError as error:
        # Python's teardown of a broken cluster can wait for the lost peer; the
        # checkpoints on disk are complete and the log is flushed: end now.
        print(f"error: {error}", file=sys.stderr, flush=True)
        logging.flush()
        os._exit(CLUSTER_EXIT_CODE)
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
