"""The MLPerf training log of a run (``--mlperf_log FILE``), in the mlperf-logging format.

It carries the MLPerf ResNet events and hyperparameter keys, so a run can
be compared with the MLPerf ResNet reference's logs and checked with the
``mlperf-logging`` package's compliance checker (training ruleset 4.0.0,
the last with ResNet):

    python -m mlperf_logging.compliance_checker --usage training --ruleset 4.0.0 FILE

A block is the training between two evaluations (``--epochs_between_evals``);
``eval_accuracy`` is top-1 as a fraction. ``run_stop`` says ``success`` when
an evaluation reached ``--target_accuracy``. Only the chief writes. The file
covers one start of the program: an MLPerf run is never resumed, so a
resumed run's log begins at its restart. The closed division also fixes
hyperparameters the paper does not use (README, MLPerf).
"""

from __future__ import annotations

import logging
import math


class MLPerfLog:
    """Writes the events of one training run; the trainer calls its hooks
    (``training_from``, ``loop_starting``, ``epoch_ended``, ``evaluated``,
    ``finished``)."""

    def __init__(self, run, strategy, source, trainer, init_start_ms: int, enabled: bool = True):
        """``init_start_ms``: when the program started (before the model, data and
        strategy were built: MLPerf's init phase)."""
        self.enabled = enabled
        self.trainer = trainer
        if not enabled:
            return
        from mlperf_logging.mllog import constants
        from mlperf_logging.mllog.mllog import MLLogger

        self.c = constants
        python_logger = logging.getLogger("conadv.run.mlperf_log")
        python_logger.propagate = False  # the file only, not the console
        python_logger.setLevel(logging.INFO)
        for handler in list(python_logger.handlers):
            python_logger.removeHandler(handler)
        handler = logging.FileHandler(run.mlperf_log, mode="w")
        handler.setLevel(logging.INFO)
        python_logger.addHandler(handler)
        self.log = MLLogger(logger=python_logger, default_stack_offset=2)
        self._block_open = False
        self._open_epoch = None
        self._log_init(run, strategy, source, init_start_ms)

    # --------------------------------------------------------------- init

    def _log_init(self, run, strategy, source, init_start_ms):
        c, log, train = self.c, self.log, run.train
        log.event(c.CACHE_CLEAR, True, time_ms=init_start_ms)
        log.start(c.INIT_START, time_ms=init_start_ms)
        log.event(c.SUBMISSION_BENCHMARK, c.RESNET)
        division = run.mlperf_division
        if division == "auto":
            division = c.CLOSED if train.method == "vanilla" else c.OPEN
        log.event(c.SUBMISSION_DIVISION, division)
        log.event(c.SUBMISSION_ORG, run.mlperf_org)
        log.event(c.SUBMISSION_PLATFORM, run.mlperf_platform or platform_name(strategy))
        log.event(c.SUBMISSION_STATUS, c.RESEARCH)
        log.event(c.SEED, train.seed)
        log.event(c.GLOBAL_BATCH_SIZE, train.global_batch_size)
        log.event(c.GRADIENT_ACCUMULATION_STEPS, train.accumulation_steps)
        log.event(c.TRAIN_SAMPLES, source.num_train_examples)
        log.event(c.EVAL_SAMPLES, source.num_eval_examples)
        for key, value in optimizer_keys(train, self.trainer).items():
            log.event(key, value)
        # Not MLPerf rules, but what makes this run ConAdv (unknown keys are allowed).
        log.event("label_smoothing", train.label_smoothing)
        log.event("conadv_method", train.method)
        if train.method != "vanilla":
            log.event("conadv_attack_eps", train.attack.eps)
            log.event("conadv_attack_steps", train.attack.num_steps)
        if train.method == "conadv":
            log.event("conadv_staleness", train.staleness)
        log.end(c.INIT_STOP)

    # -------------------------------------------------------------- hooks

    def _epoch(self, step: int) -> int:
        """MLPerf epoch numbers count from 1: the epoch that ``step`` lies in."""
        return step // self.trainer.steps_per_epoch + 1

    def _block_start(self, step: int):
        every = self.trainer.eval_every
        count = max(1, math.ceil(every / self.trainer.steps_per_epoch))
        self.log.start(
            self.c.BLOCK_START,
            metadata={self.c.FIRST_EPOCH_NUM: self._epoch(step), self.c.EPOCH_COUNT: count},
        )
        self._block_first_epoch = self._epoch(step)
        self._block_open = True

    def _block_stop(self):
        if self._block_open:
            self.log.end(
                self.c.BLOCK_STOP, metadata={self.c.FIRST_EPOCH_NUM: self._block_first_epoch}
            )
            self._block_open = False

    def training_from(self, step: int):
        if not self.enabled:
            return
        self.log.start(self.c.RUN_START)
        if step < self.trainer.train_steps:  # a run resumed at its end trains nothing
            self._block_start(step)

    def loop_starting(self, step: int):
        """Opens the epoch ``step`` lies in, inside the open block, if none is open."""
        if self.enabled and self._open_epoch is None:
            self._epoch_start(step)

    def _epoch_start(self, step: int):
        self._open_epoch = self._epoch(step)
        self.log.start(self.c.EPOCH_START, metadata={self.c.EPOCH_NUM: self._open_epoch})

    def _epoch_stop(self):
        if self._open_epoch is not None:
            self.log.end(self.c.EPOCH_STOP, metadata={self.c.EPOCH_NUM: self._open_epoch})
            self._open_epoch = None

    def epoch_ended(self, step: int):
        """``step`` is the first step of a new epoch (opened by the next loop)."""
        if self.enabled:
            self._epoch_stop()

    def evaluated(self, step: int, result: dict):
        if not self.enabled:
            return
        c = self.c
        self._block_stop()
        epoch = max(1, math.ceil(step / self.trainer.steps_per_epoch))
        self.log.start(c.EVAL_START, metadata={c.EPOCH_NUM: epoch})
        self.log.event(c.EVAL_ACCURACY, float(result["top1"]), metadata={c.EPOCH_NUM: epoch})
        self.log.end(c.EVAL_STOP, metadata={c.EPOCH_NUM: epoch})
        if step < self.trainer.train_steps:
            self._block_start(step)

    def finished(self, step: int, reached: bool):
        if not self.enabled:
            return
        self._epoch_stop()
        self._block_stop()
        status = self.c.SUCCESS if reached else self.c.ABORTED
        self.log.end(self.c.RUN_STOP, metadata={self.c.STATUS: status})
        for handler in self.log.logger.handlers:
            handler.flush()


def platform_name(strategy) -> str:
    """``<replicas>x<device kind>``, e.g. ``8xGPU`` or ``512xTPU``."""
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.TPUStrategy):
        kind = "TPU"
    elif tf.config.list_logical_devices("GPU"):
        kind = "GPU"
    else:
        kind = "CPU"
    return f"{strategy.num_replicas_in_sync}x{kind}"


def optimizer_keys(train, trainer) -> dict:
    """The MLPerf ResNet optimizer keys of this run (LARS, or SGD for momentum)."""
    warmup_steps = min(round(train.warmup_epochs * trainer.steps_per_epoch), trainer.train_steps)
    decay_steps = trainer.train_steps - warmup_steps
    if train.optimizer == "lars":
        return {
            "opt_name": "lars",
            "lars_opt_base_learning_rate": train.learning_rate,
            "lars_opt_end_learning_rate": train.end_learning_rate,
            "lars_opt_learning_rate_decay_poly_power": train.poly_power,
            "lars_opt_learning_rate_decay_steps": decay_steps,
            # The trust ratio has no epsilon term (official/lars.py).
            "lars_epsilon": 0.0,
            "lars_opt_learning_rate_warmup_epochs": train.warmup_epochs,
            "lars_opt_momentum": train.momentum,
            "lars_opt_weight_decay": train.weight_decay,
        }
    return {
        "opt_name": "sgd",
        "sgd_opt_base_learning_rate": train.learning_rate,
        "sgd_opt_end_learning_rate": train.end_learning_rate,
        "sgd_opt_learning_rate_decay_poly_power": train.poly_power,
        "sgd_opt_learning_rate_decay_steps": decay_steps,
        "sgd_opt_weight_decay": train.weight_decay,
        "sgd_opt_momentum": train.momentum,
        "opt_learning_rate_warmup_epochs": train.warmup_epochs,
        # Examples over which BatchNorm statistics are computed.
        "model_bn_span": trainer.micro_batch
        * (trainer.bn_group_size or trainer.strategy.num_replicas_in_sync),
    }
