"""The training and evaluation loop: MLPerf-style host loops around a compiled step.

One host call runs ``steps_per_loop`` steps inside a single ``tf.function``
(a ``tf.range`` loop around ``strategy.run``), so the host only wakes up to
log, evaluate and checkpoint. Everything that must survive a restart — model,
optimizer (its step counter is the global step) and the ConAdv ring buffer —
is in one ``tf.train.Checkpoint`` under ``model_dir``, and a run started on a
``model_dir`` with a checkpoint resumes from it. The input stream is not
saved: it is a function of the seed and the step (``input_pipeline/epochs.py``),
so a resumed run opens it at the batch it needs next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from conadv import attack as attack_lib
from conadv import steps as steps_lib
from conadv.ring_buffer import RingBuffer
from conadv.run import export as export_lib
from conadv.run import nonfinite
from conadv.run.metrics import ReplicaSums
from conadv.run.nonfinite import NonFiniteError, NonFiniteGuard
from conadv.run.preemption import PreemptedError, PreemptionWatcher
from conadv.run.run_files import RunFiles
from input_pipeline.base import EVAL, TRAIN, TRAIN_EVAL, DataSource
from official import losses, optimizers, precision, resnet, schedules
from official import split_batch_norm as bn_lib
from official.accumulation import GradientAccumulator
from official.precise_bn import PreciseBatchNorm

EVAL_SUMS = ("examples", "loss", "top1", "top5", "robust_loss", "robust_top1", "robust_top5")


class CheckpointMismatchError(ValueError):
    """A checkpoint in model_dir that cannot be restored into the model the flags describe."""


@dataclasses.dataclass
class TrainConfig:
    """One run, as the flags describe it (see ``flags/``)."""

    model_dir: str
    method: str = steps_lib.CONADV
    staleness: int = 1
    model: str = "resnet20"
    width_multiplier: float = 1.0
    bn_group_size: int | None = None  # None: the smallest group of >= 64 examples
    #: BatchNorm moving statistics: moving ← momentum·moving + (1 − momentum)·batch.
    bn_momentum: float = 0.9
    #: Batches of training examples whose population statistics replace the main
    #: branch's moving statistics for evaluation and export (0: the moving ones).
    precise_bn_batches: int = 200
    precision: str = "float32"
    update_pass: str = steps_lib.CONCATENATED
    global_batch_size: int = 512
    #: Micro-batches per optimizer step (gradient accumulation).
    accumulation_steps: int = 1
    eval_batch_size: int = 512
    train_steps: int | None = None
    train_epochs: float = 30.0
    steps_per_loop: int = 10
    epochs_between_evals: float = 10.0
    checkpoint_steps: int = 0
    optimizer: str = "lars"
    learning_rate: float = 1.0
    warmup_epochs: float = 5.0
    lr_schedule: str = "poly"
    poly_power: float = 2.0
    end_learning_rate: float = 0.0001
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    lars_eta: float = 0.001
    attack: attack_lib.AttackConfig = dataclasses.field(default_factory=attack_lib.AttackConfig)
    #: Robust evaluation: the main branch, as evaluated, under this attack (None: clean only).
    eval_attack: attack_lib.AttackConfig | None = None
    jit_compile: bool = False
    seed: int = 0
    export_dir: str | None = None
    max_checkpoints: int = 3
    #: Eval top-1 whose first reaching is timed (summary.json ``time_to_target_s``).
    target_accuracy: float = 0.759


class Trainer:
    """Builds model, optimizer, steps and data for one run, then trains and evaluates."""

    def __init__(
        self,
        config: TrainConfig,
        strategy: tf.distribute.Strategy,
        source: DataSource,
        files: RunFiles | None = None,
    ):
        self.config = config
        self.strategy = strategy
        self.source = source
        self.files = files or RunFiles(config.model_dir, strategy)
        replicas = strategy.num_replicas_in_sync
        self.steps_per_epoch = max(1, source.num_train_examples // config.global_batch_size)
        self.train_steps = int(
            config.train_steps or max(1, round(config.train_epochs * self.steps_per_epoch))
        )
        self.eval_every = max(1, round(config.epochs_between_evals * self.steps_per_epoch))
        self.per_replica_batch = config.global_batch_size // replicas
        self.accumulation_steps = int(config.accumulation_steps)
        #: Examples per replica in one forward pass (a micro-batch under accumulation).
        self.micro_batch = self.per_replica_batch // self.accumulation_steps
        self.bn_group_size = self._bn_group_size()
        self.compute_dtype = precision.compute_dtype(config.precision)
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
            schedule = schedules.from_config(config, self.steps_per_epoch, self.train_steps)
            self.optimizer = optimizers.build_optimizer(
                config.optimizer,
                learning_rate=schedule,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                eta=config.lars_eta,
            )
            if precision.needs_loss_scaling(config.precision):
                self.optimizer = precision.LossScaleOptimizer(self.optimizer)
            # Slots must exist before the first distributed step (docs/design.md).
            self.optimizer.build(self.model.trainable_variables)
            self.train_sums = ReplicaSums(steps_lib.TRAIN_SUMS, name="train_sums")
            self.eval_sums = ReplicaSums(EVAL_SUMS, name="eval_sums")
        self.guard = NonFiniteGuard(strategy)

        self.ring = None
        if config.method == steps_lib.CONADV:
            # τ steps ahead, in micro-batches: τ·N slots per replica.
            self.ring = RingBuffer(
                strategy,
                config.staleness * self.accumulation_steps,
                self.micro_batch,
                source.image_size,
                dtype=self.compute_dtype,
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
            compute_dtype=self.compute_dtype,
            guard=self.guard,
            accumulation_steps=self.accumulation_steps,
            accumulator=self._accumulator(),
        )
        # Each replica step is one XLA program when jit_compile is set (always
        # on TPU); the loop around it, and the iterator, stay outside.
        self._train_step = steps_lib.TrainStep(
            config.method, self.context, strategy, jit_compile=config.jit_compile
        )
        self._eval_replica_step = tf.function(self._eval_replica, jit_compile=config.jit_compile)
        self.precise_bn = PreciseBatchNorm(self.model, strategy)
        self._precise_cache = None  # (step, PreciseStatistics) of the latest computation
        self._train_loop = tf.function(self._train_loop_fn)

        self.iterator = None  # opened by train(), at the step it starts from
        self._last_saved = -1  # the step of the latest complete checkpoint (-1: none)
        self._checkpoint, self._manager, self._ring_manager = self._make_checkpoint()
        # Only the chief's summaries are the run's (conadv/run/run_files.py).
        self._writers = {
            name: tf.summary.create_file_writer(os.path.join(self.files.private_dir(), name))
            for name in ("train", "eval")
        }

    def _accumulator(self) -> GradientAccumulator | None:
        """Per-replica gradient sums for accumulation over micro-batches (N > 1)."""
        if self.accumulation_steps == 1:
            return None
        return GradientAccumulator(
            self.strategy, self.model.trainable_variables, scalars=("clean", "adversarial")
        )

    def _bn_group_size(self) -> int:
        """``--bn_group_size``, or the smallest group whose statistics cover 64 examples."""
        replicas = self.strategy.num_replicas_in_sync
        if self.config.bn_group_size is not None:
            size = bn_lib.check_group_size(self.config.bn_group_size, replicas)
            logging.info("BatchNorm group size %d (from --bn_group_size)", size)
            return size
        size, reason = bn_lib.default_group_size(self.micro_batch, replicas)
        logging.info("BatchNorm group size %d: %s", size, reason)
        return size

    # ----------------------------------------------------------------- state

    def _make_checkpoint(self):
        """The run's checkpoint (model, optimizer, the chief's ring) and this worker's ring.

        Every worker reads weights and optimizer state from the chief's
        checkpoints in model_dir; the chief writes them. A non-chief worker's
        ring slots go to its own checkpoints in ``worker_<i>``
        (``conadv/run/run_files.py``). Ring state is keyed by worker and layout: a
        checkpoint from another replica count, batch or worker leaves it
        unrestored, and the ring is then refilled from the restored weights.
        """
        items = dict(model=self.model, optimizer=self.optimizer)
        ring_key = None
        if self.ring is not None:
            ring_key = f"ring_w{self.files.worker_index}_{self.ring.layout}"
            ring_items = tf.train.Checkpoint(**self.ring.checkpoint_items())
            if self.files.is_chief:
                items[ring_key] = ring_items
        checkpoint = tf.train.Checkpoint(**items)
        manager = tf.train.CheckpointManager(
            checkpoint,
            directory=self.config.model_dir,
            max_to_keep=self.config.max_checkpoints,
            checkpoint_name="ckpt",
            step_counter=self.optimizer.iterations,
        )
        ring_manager = None
        if ring_key is not None and not self.files.is_chief:
            ring_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**{ring_key: ring_items}),
                directory=self.files.private_dir(),
                max_to_keep=self.config.max_checkpoints,
                checkpoint_name="ring",
                step_counter=self.optimizer.iterations,
            )
        return checkpoint, manager, ring_manager

    @property
    def global_step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def has_checkpoint(self) -> bool:
        return self._manager.latest_checkpoint is not None

    def _checkpoint_steps(self) -> list[int]:
        """Steps of the chief's kept checkpoints (every worker reads model_dir)."""
        return sorted(int(path.rsplit("-", 1)[-1]) for path in self._manager.checkpoints)

    def _resume_step(self) -> int:
        """The step to resume from: the latest every worker has its state for (-1: none).

        A non-chief worker's ring checkpoints lag the chief's by at most one
        save if the cluster was killed in between; a worker with no ring at
        all (its directory was removed at the end of a finished run) does not
        hold the others back: its ring will be refilled, and so will every
        worker's.
        """
        chief_steps = self._checkpoint_steps()
        latest = chief_steps[-1] if chief_steps else -1
        low, high = self.files.agreed_step(latest), -self.files.agreed_step(-latest)
        if low != high:
            raise CheckpointMismatchError(
                f"the workers see different latest checkpoints in --model_dir="
                f"{self.config.model_dir} (steps {low} to {high}); every worker must use "
                "the same shared directory"
            )
        local = latest
        if self._ring_manager is not None and self._ring_manager.checkpoints:
            own = {int(path.rsplit("-", 1)[-1]) for path in self._ring_manager.checkpoints}
            local = max((step for step in chief_steps if step in own), default=latest)
        return self.files.agreed_step(local)

    def restore(self) -> int:
        """Restores the checkpoint to resume from, if any; returns the step.

        Every worker restores weights and optimizer state from the chief's
        checkpoint at ``_resume_step`` and its own ring from the same step; if
        any worker has no ring for it, every worker refills its ring
        (``conadv/run/run_files.py``).
        """
        self.files.remove_interrupted_writes()
        step = self._resume_step()
        if step >= 0:
            path = os.path.join(self.config.model_dir, f"ckpt-{step}")
            try:
                self._checkpoint.restore(path).expect_partial()
            except (ValueError, tf.errors.InvalidArgumentError) as error:
                raise CheckpointMismatchError(
                    f"the checkpoint {path} does not fit this model "
                    f"({str(error).splitlines()[0][:200]}); use a new --model_dir or the "
                    "flags it was trained with"
                ) from None
            if step > 0 and self.global_step == 0:
                # The optimizer's state lives elsewhere in this checkpoint (for
                # example it was saved with or without float16 loss scaling).
                raise CheckpointMismatchError(
                    f"the checkpoint {path} was saved at step {step} but its optimizer "
                    "state does not fit this run (another --precision or --optimizer?); "
                    "use the flags it was trained with or a new --model_dir"
                )
            if self._ring_manager is not None:
                own = os.path.join(self._ring_manager.directory, f"ring-{step}")
                if tf.io.gfile.exists(own + ".index"):
                    self._ring_manager.checkpoint.restore(own).expect_partial()
            logging.info("Restored %s at step %d", path, self.global_step)
        self._last_saved = step
        if self.ring is not None and not self.files.all_agree(self.ring.is_filled()):
            if step >= 0:
                logging.info("Not every worker has its ring for step %d: all are refilled", step)
            self.ring.reset()
        return self.global_step

    def save(self) -> str:
        """Every worker saves what is its own; returns the chief's checkpoint path."""
        step = self.global_step
        if self._ring_manager is not None:
            self._ring_manager.save(checkpoint_number=step)
        path = os.path.join(self.config.model_dir, f"ckpt-{step}")
        if self.files.is_chief:
            path = self._manager.save(checkpoint_number=step)
            logging.info("Saved checkpoint %s", path)
        self._last_saved = step
        return path

    # ------------------------------------------------------------- training

    def _train_loop_fn(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self._train_step(iterator)

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

        first = self.global_step * self.accumulation_steps
        fill(
            self.iterator, tf.constant(first, tf.int64), tf.constant(self.ring.staleness, tf.int64)
        )
        self.ring.mark_filled()

    def close(self):
        """Flushes and closes the TensorBoard writers."""
        for writer in self._writers.values():
            writer.close()

    def _stop_if_diverged(self):
        """Raises ``NonFiniteError`` (and saves nothing) if a step of the last loop diverged.

        Every worker raises, naming the earliest bad step of any worker: one
        replica's NaN reaches every worker's weights through the all-reduce.
        """
        bad = self.guard.first()
        never = 2**62
        local = never if bad is None else bad[0] * 4 + nonfinite.code_of(bad[1])
        first = self.files.agreed_step(local)  # the minimum over workers
        if first < never:
            step, code = divmod(first, 4)
            last_good = (
                f"ckpt-{self._last_saved}" if self._last_saved >= 0 else "none (no checkpoint yet)"
            )
            raise NonFiniteError(
                f"non-finite {nonfinite.QUANTITIES[code]} at step {step}; "
                f"last good checkpoint {last_good}"
            )

    def _next_stop(self, step: int, evaluate: bool, at_epochs: bool = False) -> int:
        stops = [self.train_steps, step + self.config.steps_per_loop]
        if at_epochs:  # the events log epoch boundaries
            stops.append((step // self.steps_per_epoch + 1) * self.steps_per_epoch)
        if evaluate:
            stops.append((step // self.eval_every + 1) * self.eval_every)
        if self.config.checkpoint_steps > 0:
            every = self.config.checkpoint_steps
            stops.append((step // every + 1) * every)
        return min(stops)

    def open_training_stream(self, step: int):
        """The training iterator, positioned at the batch the run reads next at ``step``.

        A restored, filled ring already holds the batches of steps
        ``step … step+τ−1`` (the uninterrupted run read them τ steps ahead), so
        the stream continues after them; an empty ring is filled from the
        stream first.
        """
        filled = self.ring is not None and self.ring.is_filled()
        ring_ahead = self.config.staleness if filled else 0
        self.iterator = iter(
            self.source.distribute(
                self.strategy,
                TRAIN,
                self.config.global_batch_size,
                start_step=step + ring_ahead,
                micro_batches=self.accumulation_steps,
            )
        )

    def train(self, evaluate: bool = True, events=None) -> dict:
        """Trains to ``train_steps`` (resuming if possible); returns the run summary.

        ``events`` (optional, e.g. ``conadv.run.mlperf_log.MLPerfLog``) is told
        where training starts, where each host loop starts, each epoch boundary
        (host loops then also end there), each evaluation and the end.
        """
        config = self.config
        start_time = time.time()
        step = self.restore()
        if events is not None:
            events.training_from(step)  # the prologue's attacks are part of the run
        self.open_training_stream(step)
        if self.ring is not None and not self.ring.is_filled():
            self.fill_ring_buffer()
        accumulation = ""
        if self.accumulation_steps > 1:
            accumulation = (
                f" ({self.accumulation_steps} accumulated micro-batches of "
                f"{self.micro_batch} per replica)"
            )
        logging.info(
            "Training %s (%s) from step %d to %d: %d steps/epoch, effective global batch %d%s "
            "on %d replicas",
            config.model,
            config.method,
            step,
            self.train_steps,
            self.steps_per_epoch,
            config.global_batch_size,
            accumulation,
            self.strategy.num_replicas_in_sync,
        )
        timed_images, timed_seconds, first_loop = 0, 0.0, True
        last_train, eval_result, time_to_target = {}, {}, None
        with PreemptionWatcher() as preemption:
            while step < self.train_steps:
                stop = self._next_stop(step, evaluate, at_epochs=events is not None)
                if events is not None:
                    events.loop_starting(step)
                num_steps = stop - step
                self.train_sums.reset()
                loop_start = time.time()
                self._train_loop(self.iterator, tf.constant(num_steps, tf.int32))
                totals = self.train_sums.totals()  # reading waits for the loop to finish
                seconds = time.time() - loop_start
                self._stop_if_diverged()
                step = self.global_step
                images = num_steps * config.global_batch_size
                if not first_loop or step >= self.train_steps:
                    timed_images += images
                    timed_seconds += seconds
                first_loop = False
                last_train = self._log_train(
                    step, totals, images / max(seconds, 1e-9), seconds / num_steps
                )
                at_eval = evaluate and (step % self.eval_every == 0 or step >= self.train_steps)
                at_checkpoint = config.checkpoint_steps > 0 and step % config.checkpoint_steps == 0
                saved = at_eval or at_checkpoint or step >= self.train_steps
                if saved:
                    self.save()
                # One worker's SIGTERM stops every worker at the same step.
                stop_requested = self.files.any_asks(preemption.requested)
                if stop_requested and step < self.train_steps:
                    if not saved:
                        self.save()
                    raise PreemptedError(
                        f"preempted (SIGTERM) at step {step}: saved ckpt-{step}; "
                        "run the same command again to resume"
                    )
                if events is not None and step % self.steps_per_epoch == 0:
                    events.epoch_ended(step)
                if at_eval:
                    eval_result = self.evaluate(EVAL)
                    self.log_evaluation(step, eval_result)
                    if time_to_target is None and eval_result["top1"] >= config.target_accuracy:
                        time_to_target = time.time() - start_time
                    if events is not None:
                        events.evaluated(step, eval_result)
        if events is not None:
            events.finished(step, reached=time_to_target is not None)

        summary = {
            "method": config.method,
            "staleness": config.staleness if config.method == steps_lib.CONADV else 0,
            "global_batch_size": config.global_batch_size,
            "accumulation_steps": self.accumulation_steps,
            "train_steps": self.train_steps,
            "epochs": self.train_steps / self.steps_per_epoch,
            "train_top1": None,
            "eval_top1": eval_result.get("top1"),
            "eval_top5": eval_result.get("top5"),
            # Under --eval_attack_eps (None otherwise).
            "eval_robust_top1": eval_result.get("robust_top1"),
            # How the evaluated (and exported) main branch got its BatchNorm statistics.
            "bn_statistics": eval_result.get("bn_statistics"),
            "images_per_second": (timed_images / timed_seconds) if timed_seconds else None,
            "wall_time_s": time.time() - start_time,
            "final_train_loss": last_train.get("clean_loss"),
            "target_accuracy": config.target_accuracy,
            # Seconds from this start to the first evaluation at the target (None: not reached).
            "time_to_target_s": time_to_target,
        }
        if evaluate:
            if not eval_result:  # resumed at the end: nothing was trained, evaluate anyway
                eval_result = self.evaluate(EVAL)
                summary.update(
                    eval_top1=eval_result["top1"],
                    eval_top5=eval_result["top5"],
                    eval_robust_top1=eval_result.get("robust_top1"),
                    bn_statistics=eval_result["bn_statistics"],
                )
            summary["train_top1"] = self.evaluate(TRAIN_EVAL)["top1"]
            if summary["bn_statistics"]["kind"] == "precise":
                # What the moving averages alone would have given, for comparison.
                summary["eval_top1_moving_average"] = self.evaluate(EVAL, precise=False)["top1"]
            summary["wall_time_s"] = time.time() - start_time
        return summary

    def _log_train(self, step, totals, images_per_second, seconds_per_step) -> dict:
        examples = max(totals["examples"], 1.0)
        values = {
            "clean_loss": totals["clean_loss"] / examples,
            "train_top1": totals["clean_correct"] / examples,
            "learning_rate": float(self.optimizer.learning_rate.numpy()),
            "images_per_second": images_per_second,
        }
        if totals["adv_examples"]:
            values["adv_loss"] = totals["adv_loss"] / totals["adv_examples"]
            values["adv_linf"] = totals["adv_linf"] / totals["adv_examples"]
        with self._writers["train"].as_default(step=step):
            tf.summary.scalar("loss/clean", values["clean_loss"])
            tf.summary.scalar("top1/train", values["train_top1"])
            tf.summary.scalar("learning_rate", values["learning_rate"])
            tf.summary.scalar("images_per_second", images_per_second)
            if "adv_loss" in values:
                tf.summary.scalar("loss/adversarial", values["adv_loss"])
                tf.summary.scalar("attack/linf", values["adv_linf"])
        eta = format_duration((self.train_steps - step) * seconds_per_step)
        adv = f" adv {values['adv_loss']:.3f}" if "adv_loss" in values else ""
        print(
            f"step {step}/{self.train_steps} | loss {values['clean_loss']:.3f}{adv}"
            f" | top1 {values['train_top1']:.3f} | lr {values['learning_rate']:.4g}"
            f" | {images_per_second:.0f} img/s | ETA {eta}",
            flush=True,
        )
        return values

    def log_evaluation(self, step, result):
        """TensorBoard scalars and the console line of one evaluation."""
        with self._writers["eval"].as_default(step=step):
            tf.summary.scalar("top1/eval", result["top1"])
            tf.summary.scalar("top5/eval", result["top5"])
            tf.summary.scalar("loss/eval", result["loss"])
            if "robust_top1" in result:
                tf.summary.scalar("top1/robust", result["robust_top1"])
                tf.summary.scalar("top5/robust", result["robust_top5"])
                tf.summary.scalar("loss/robust", result["robust_loss"])
        robust = ""
        if "robust_top1" in result:
            robust = (
                f" robust top1 {result['robust_top1']:.4f} (eps {result['eval_attack']['eps']:g})"
            )
        print(
            f"eval at step {step}: top1 {result['top1']:.4f} top5 {result['top5']:.4f}"
            f" loss {result['loss']:.4f}{robust} ({int(result['examples'])} images)",
            flush=True,
        )

    # ----------------------------------------------------------- evaluation

    def _eval_replica(self, batch):
        images, labels = batch
        k = min(5, self.source.num_classes)

        def sums(logits, prefix=""):
            return {
                f"{prefix}loss": tf.reduce_sum(losses.cross_entropy(labels, logits)),
                f"{prefix}top1": tf.reduce_sum(losses.top_k_correct(labels, logits, 1)),
                f"{prefix}top5": tf.reduce_sum(losses.top_k_correct(labels, logits, k)),
            }

        logits = bn_lib.call_model(self.model, images, False, "main")
        values = sums(logits)
        if self.config.eval_attack is not None:
            # The attack sees the model as evaluated; a fixed seed per replica
            # makes robust accuracy reproducible.
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            seed = tf.stack(
                [tf.constant(self.config.seed + 1, tf.int64), tf.cast(replica, tf.int64)]
            )
            adversarial = attack_lib.pgd_attack(
                self.model,
                images,
                labels,
                self.config.eval_attack,
                seed=seed,
                num_classes=self.source.num_classes,
                # Float16 input gradients flush to zero without the training attack's scale.
                loss_scale=precision.attack_loss_scale(self.compute_dtype),
                training=False,
            )
            values.update(sums(self.model(adversarial, training=False), prefix="robust_"))
        self.eval_sums.add(examples=tf.size(labels), **values)

    def precise_statistics(self):
        """The precise statistics at the current step (None if ``precise_bn_batches`` is 0).

        Computed once per step, with collectives across every worker: under
        several workers each must call this before only the chief exports.
        """
        batches = self.config.precise_bn_batches
        if batches <= 0:
            return None
        step = self.global_step
        if self._precise_cache is None or self._precise_cache[0] != step:
            if not hasattr(self, "_precise_dataset"):
                self._precise_dataset = self.source.distribute(
                    self.strategy,
                    TRAIN_EVAL,
                    self.micro_batch * self.strategy.num_replicas_in_sync,
                )
            statistics = self.precise_bn.compute(self._precise_dataset, batches)
            self._precise_cache = (step, statistics)
            logging.info(
                "Precise BatchNorm statistics at step %d: %d batches, %d training images",
                step,
                statistics.batches,
                statistics.examples,
            )
        return self._precise_cache[1]

    @contextlib.contextmanager
    def evaluation_statistics(self, precise: bool = True):
        """The main branch's BatchNorm statistics as evaluated and exported, inside the context.

        With ``precise_bn_batches`` N > 0 they are the population statistics
        of N batches of training examples under the current weights
        (``official/precise_bn.py``), computed once per global step; the
        moving averages training keeps are put back on exit, so evaluating
        never changes what training (or a resumed run) computes. The batches
        are the training images with the *evaluation* preprocessing (the
        ``TRAIN_EVAL`` split): the statistics describe the inputs the
        evaluated network is given, without looking at the evaluation set.
        Each replica's batch is the micro-batch training normalises over, so
        the forward pass's batch statistics are those of training. Yields
        what ``summary.json`` and ``eval.json`` record as ``bn_statistics``.
        ``precise=False`` keeps the moving averages.
        """
        statistics = self.precise_statistics() if precise else None
        if statistics is None:
            yield {"kind": "moving_average", "momentum": self.config.bn_momentum}
            return
        with self.precise_bn.applied(statistics):
            yield {
                "kind": "precise",
                "batches": statistics.batches,
                "examples": statistics.examples,
                "data": "training images, evaluation preprocessing",
            }

    def evaluate(self, split: str = EVAL, precise: bool = True) -> dict:
        """Main-branch accuracy over one pass of ``split`` (``evaluation_statistics``)."""
        if not hasattr(self, "_eval_datasets"):
            self._eval_datasets = {}
            self._eval_loop = tf.function(self._eval_loop_fn)
        if split not in self._eval_datasets:
            self._eval_datasets[split] = self.source.distribute(
                self.strategy, split, self.config.eval_batch_size
            )
        self.eval_sums.reset()
        with self.evaluation_statistics(precise) as bn_statistics:
            self._eval_loop(self._eval_datasets[split])
        totals = self.eval_sums.totals()
        n = max(totals["examples"], 1.0)
        result = {"examples": totals["examples"], "bn_statistics": bn_statistics}
        keys = ["loss", "top1", "top5"]
        attack = self.config.eval_attack
        if attack is not None:
            keys += ["robust_loss", "robust_top1", "robust_top5"]
            result["eval_attack"] = {
                "eps": attack.eps,
                "steps": attack.num_steps,
                "step_size": attack.alpha,
            }
        result.update({key: totals[key] / n for key in keys})
        return result

    def _eval_loop_fn(self, dataset):
        for batch in dataset:
            self.strategy.run(self._eval_replica_step, args=(batch,))

    # --------------------------------------------------------------- export

    def export(self, export_dir: str | None = None) -> dict:
        """The main branch as ``model.keras`` and a serving SavedModel
        (``conadv/run/export.py``)."""
        export_dir = (
            export_dir or self.config.export_dir or os.path.join(self.config.model_dir, "export")
        )
        with self.evaluation_statistics():
            return export_lib.export_model(
                self.model, export_dir, self.source.image_size, self.source.class_names
            )

    def predict(self, split: str = EVAL) -> list[list[int]]:
        """Top-k class ids (k = 5, or the class count) of every example of ``split``, in order.

        One host pass with the main branch, as evaluated; for checking what is
        served against what is evaluated.
        """
        k = min(5, self.source.num_classes)
        model_fn = tf.function(lambda x: tf.math.top_k(self.model(x, training=False), k).indices)
        ids = []
        with self.evaluation_statistics():
            for images, _ in self.source.dataset(split, self.config.eval_batch_size):
                ids.extend(model_fn(images).numpy().tolist())
        return ids


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
