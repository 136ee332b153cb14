"""The training loop: the paper's Algorithm 1 around MLPerf-style host loops.

Algorithm 1 (ConAdv), at step t on every worker: the loss of the clean batch
through the main BatchNorm and of the adversarial batch made from θ_{t−τ}
through the auxiliary BatchNorm gives g(θ_t) (eq. 4), averaged over workers
to update θ_t → θ_{t+1}; from the same θ_t, batch t+τ is attacked for a
later step (eq. 5). One such step, for each method, is ``conadv/steps.py``;
the τ batches the first steps need are attacked before step 0 (the
prologue). This module runs the steps: ``steps_per_loop`` of them in one
``tf.function`` (a ``tf.range`` loop around ``strategy.run``), so the host
only wakes up to log, checkpoint, evaluate and honour preemption — each the
job of an object the loop calls (``conadv/run/checkpoints.py``,
``conadv/run/summaries.py``, ``conadv/evaluation.py``,
``conadv/run/preemption.py``; a lost worker or tf.data service dispatcher,
``conadv/run/cluster.py``). The input stream is not saved: it is a
function of the seed and the step (``input_pipeline/epochs.py``), so a
resumed run opens it at the batch it needs next.
"""

from __future__ import annotations

import time

import keras
import tensorflow as tf
from absl import logging

from conadv import steps as steps_lib
from conadv.evaluation import Evaluator, summary_evaluations
from conadv.ring_buffer import RingBuffer
from conadv.run.checkpoints import CheckpointMismatchError, RunCheckpoints
from conadv.run.cluster import DispatcherWatch
from conadv.run.metrics import ReplicaSums
from conadv.run.nonfinite import NonFiniteGuard
from conadv.run.preemption import PreemptedError, PreemptionWatcher
from conadv.run.run_files import RunFiles
from conadv.run.summaries import RunSummaries, run_summary
from conadv.run_config import TrainConfig
from input_pipeline.base import EVAL, TRAIN, DataSource
from official import group_moments, optimizers, precision, resnet, schedules
from official.accumulation import GradientAccumulator

__all__ = ["CheckpointMismatchError", "TrainConfig", "Trainer"]


class Trainer:
    """One run: its model, optimizer, ring and steps, trained and evaluated by ``train``."""

    def __init__(
        self,
        config: TrainConfig,
        strategy: tf.distribute.Strategy,
        source: DataSource,
        files: RunFiles | None = None,
    ):
        self.config, self.strategy, self.source = config, strategy, source
        self.files = files or RunFiles(config.model_dir, strategy)
        self.steps_per_epoch = max(1, source.num_train_examples // config.global_batch_size)
        self.train_steps = int(
            config.train_steps or max(1, round(config.train_epochs * self.steps_per_epoch))
        )
        self.eval_every = max(1, round(config.epochs_between_evals * self.steps_per_epoch))
        self.accumulation_steps = int(config.accumulation_steps)
        #: Examples per replica in one forward pass (a micro-batch under accumulation).
        self.micro_batch = (
            config.global_batch_size // strategy.num_replicas_in_sync // self.accumulation_steps
        )
        self.bn_group_size = _bn_group_size(config, strategy, self.micro_batch)
        compute_dtype = precision.compute_dtype(config.precision)
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            self.model = resnet.resnet(
                config.model,
                num_classes=source.num_classes,
                image_size=source.image_size,
                width_multiplier=config.width_multiplier,
                bn_group_size=self.bn_group_size,
                bn_momentum=config.bn_momentum,
                seed=config.seed,
                dtype_policy=config.precision,
            )
            self.optimizer = _optimizer(config, self.model, self.steps_per_epoch, self.train_steps)
            self.train_sums = ReplicaSums(steps_lib.TRAIN_SUMS, name="train_sums")
        self.guard = NonFiniteGuard(strategy)
        self.ring = None
        if config.method == steps_lib.CONADV:
            # τ steps ahead, in micro-batches: τ·N slots per replica.
            slots = config.staleness * self.accumulation_steps
            self.ring = RingBuffer(
                strategy,
                slots,
                self.micro_batch,
                source.image_size,
                dtype=compute_dtype,
                clean_images=config.attack_source == steps_lib.SEPARATE_ATTACK,
            )
        self.context = steps_lib.StepContext(
            model=self.model,
            optimizer=self.optimizer,
            global_batch_size=config.global_batch_size,
            num_classes=source.num_classes,
            label_smoothing=config.label_smoothing,
            attack=config.attack,
            seed=config.seed,
            sums=self.train_sums,
            ring=self.ring,
            update_pass=config.update_pass,
            compute_dtype=compute_dtype,
            guard=self.guard,
            accumulation_steps=self.accumulation_steps,
            accumulator=_accumulator(strategy, self.model, self.accumulation_steps),
            attack_source=config.attack_source,
        )
        # Each replica step is one XLA program when jit_compile is set (always
        # on TPU); the loop around it, and the iterator, stay outside.
        self._train_step = steps_lib.TrainStep(
            config.method, self.context, strategy, jit_compile=config.jit_compile
        )
        self._train_loop = tf.function(self._train_loop_fn)
        self.iterator = None  # opened by train(), at the step it starts from
        #: The step the host last saw complete: read by the watches of conadv/run/cluster.py
        #: from their threads, or after a failure, when a device variable could block.
        self.host_step = 0
        self.evaluator = Evaluator(
            self.model, strategy, source, config, self.micro_batch, lambda: self.global_step
        )
        self.checkpoints = RunCheckpoints(
            self.model,
            self.optimizer,
            self.ring,
            self.files,
            config.model_dir,
            config.max_checkpoints,
        )
        self.summaries = RunSummaries(self.files, self.train_steps, config.global_batch_size)

    @property
    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self, weights_only: bool = False) -> int:
        """Restores the latest complete checkpoint, if any (``weights_only``: the model's
        weights and the step, for a measurement in another precision); returns the step."""
        restore = self.checkpoints.restore_weights if weights_only else self.checkpoints.restore
        self.host_step = restore()
        return self.host_step

    # ------------------------------------------------------------- the loop

    def open_training_stream(self, step: int):
        """The training iterator, positioned at the batch the run reads next at ``step``.

        A restored, filled ring already holds the batches of steps
        ``step … step+τ−1`` (the uninterrupted run read them τ steps ahead), so
        the stream continues after them; an empty ring is filled from the
        stream first.
        """
        filled = self.ring is not None and self.ring.is_filled()
        self.iterator = iter(
            self.source.distribute(
                self.strategy,
                TRAIN,
                self.config.global_batch_size,
                start_step=step + (self.config.staleness if filled else 0),
                micro_batches=self.accumulation_steps,
            )
        )

    def fill_ring_buffer(self):
        """ConAdv's prologue: the τ·N micro-batches of steps t … t+τ−1, attacked
        with the current weights, into their slots (N = 1 without accumulation)."""
        prologue = tf.function(
            steps_lib.build_conadv_prologue(self.context), jit_compile=self.config.jit_compile
        )

        @tf.function
        def fill(iterator, first, count):
            for index in tf.range(first, first + count):
                self.strategy.run(prologue, args=(next(iterator), index))

        first = tf.constant(self.global_step * self.accumulation_steps, tf.int64)
        fill(self.iterator, first, tf.constant(self.ring.staleness, tf.int64))
        self.ring.mark_filled()

    def _train_loop_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self._train_step(iterator)

    def _next_stop(self, step: int, evaluate: bool, at_epochs: bool = False) -> int:
        """Where the host loop from ``step`` ends: the run's end, ``steps_per_loop`` on, and
        the next evaluation, checkpoint and (for ``events``) epoch boundary."""
        stops = [self.train_steps, step + self.config.steps_per_loop]
        if at_epochs:
            stops.append((step // self.steps_per_epoch + 1) * self.steps_per_epoch)
        if evaluate:
            stops.append((step // self.eval_every + 1) * self.eval_every)
        if self.config.checkpoint_steps > 0:
            every = self.config.checkpoint_steps
            stops.append((step // every + 1) * every)
        return min(stops)

    def _host_loop(self, step: int, stop: int) -> tuple[int, dict]:
        """Steps ``step … stop−1`` in one call (Algorithm 1's body, ``stop − step`` times):
        returns the new step and the loop's training means, logged."""
        self.train_sums.reset()
        start = time.time()
        self._train_loop(self.iterator, tf.constant(stop - step, tf.int32))
        totals = self.train_sums.totals()  # reading waits for the loop to finish
        seconds = time.time() - start
        self.guard.raise_if_diverged(self.files, self.checkpoints.last_saved)
        lr, step_now = float(self.optimizer.learning_rate.numpy()), self.global_step
        return step_now, self.summaries.log_train(step_now, stop - step, seconds, totals, lr)

    def train(self, evaluate: bool = True, events=None) -> dict:
        """Trains to ``train_steps`` (resuming if possible); returns the run summary.

        ``events`` (optional, e.g. ``conadv.run.mlperf_log.MLPerfLog``) is told
        where training starts, where each host loop starts, each epoch boundary
        (host loops then also end there), each evaluation and the end.
        """
        # A tf.data service dispatcher gone silent stops this worker in one line (a lost
        # worker: main.py's PeerWatch around every mode).
        options = self.source.options
        with DispatcherWatch(
            options.tf_data_service,
            self.config.model_dir,
            lambda: self.host_step,
            options.peer_timeout,
        ):
            return self._train(time.time(), evaluate, events)

    def _train(self, start: float, evaluate: bool, events) -> dict:
        config = self.config
        step = self.restore()  # θ, the optimizer and, if every worker has it, the ring
        if events is not None:
            events.training_from(step)  # the prologue's attacks are part of the run
        self.open_training_stream(step)
        if self.ring is not None and not self.ring.is_filled():
            self.fill_ring_buffer()  # batches t … t+τ−1 attacked with θ_t
        self.summaries.log_start(self, step)
        last_train, eval_result, time_to_target = {}, {}, None
        with PreemptionWatcher() as preemption:
            while step < self.train_steps:
                stop = self._next_stop(step, evaluate, at_epochs=events is not None)
                if events is not None:
                    events.loop_starting(step)
                step, last_train = self._host_loop(step, stop)
                self.host_step = step
                at_eval = evaluate and (step % self.eval_every == 0 or step >= self.train_steps)
                self._checkpoint(step, at_eval, preemption)
                if events is not None and step % self.steps_per_epoch == 0:
                    events.epoch_ended(step)
                if at_eval:
                    eval_result = self.evaluate(EVAL)
                    self.summaries.log_evaluation(step, eval_result)
                    if time_to_target is None and eval_result["top1"] >= config.target_accuracy:
                        time_to_target = time.time() - start
                    if events is not None:
                        events.evaluated(step, eval_result)
        if events is not None:
            events.finished(step, reached=time_to_target is not None)
        summary = run_summary(self, eval_result, last_train, time.time() - start, time_to_target)
        if evaluate:
            summary.update(summary_evaluations(self.evaluator, eval_result))
            summary["wall_time_s"] = time.time() - start
        return summary

    def _checkpoint(self, step: int, at_eval: bool, preemption):
        """Saves at evaluations, every ``checkpoint_steps`` and at the end; on a SIGTERM (of
        any worker: every worker stops at the same step) saves and raises ``PreemptedError``."""
        every = self.config.checkpoint_steps
        due = at_eval or (every > 0 and step % every == 0) or step >= self.train_steps
        if due:
            self.checkpoints.save()
        if self.files.any_asks(preemption.requested) and step < self.train_steps:
            if not due:
                self.checkpoints.save()
            raise PreemptedError(
                f"preempted (SIGTERM) at step {step}: saved ckpt-{step}; "
                "run the same command again to resume"
            )

    # ------------------------------------------------------- what it calls

    def evaluate(self, split: str = EVAL, precise: bool = True) -> dict:
        """``Evaluator.evaluate``: main-branch accuracy over one pass of ``split``."""
        return self.evaluator.evaluate(split, precise)

    def close(self):
        """Flushes and closes the TensorBoard writers."""
        self.summaries.close()


def _optimizer(config: TrainConfig, model, steps_per_epoch: int, train_steps: int):
    """LARS or momentum SGD on the schedule, loss-scaled under float16, its slots built
    (they must exist before the first distributed step: docs/design.md)."""
    schedule = schedules.from_config(config, steps_per_epoch, train_steps)
    optimizer = optimizers.build_optimizer(
        config.optimizer,
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        eta=config.lars_eta,
    )
    if precision.needs_loss_scaling(config.precision):
        optimizer = precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def _accumulator(strategy, model, accumulation_steps: int) -> GradientAccumulator | None:
    """Per-replica gradient sums for accumulation over micro-batches (N > 1)."""
    if accumulation_steps == 1:
        return None
    return GradientAccumulator(
        strategy, model.trainable_variables, scalars=("clean", "adversarial")
    )


def _bn_group_size(config: TrainConfig, strategy, micro_batch: int) -> int:
    """``--bn_group_size``, or the smallest group whose statistics cover 64 examples."""
    replicas = strategy.num_replicas_in_sync
    if config.bn_group_size is not None:
        size = group_moments.check_group_size(config.bn_group_size, replicas)
        logging.info("BatchNorm group size %d (from --bn_group_size)", size)
        return size
    size, reason = group_moments.default_group_size(micro_batch, replicas)
    logging.info("BatchNorm group size %d: %s", size, reason)
    return size
