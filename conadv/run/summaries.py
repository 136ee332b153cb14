"""What a run reports: TensorBoard scalars and console lines of each host loop and
evaluation, and the ``summary.json`` of the finished run.

Only the chief's summaries are the run's: each worker writes under its own
directory (``conadv/run/run_files.py``).
"""

from __future__ import annotations

import math
import os

import tensorflow as tf
from absl import logging

from conadv.run.run_files import RunFiles


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunSummaries:
    """The run's TensorBoard writers (``train``, ``eval``) and console lines."""

    def __init__(self, files: RunFiles, train_steps: int, global_batch_size: int):
        self.train_steps = train_steps
        self.global_batch_size = global_batch_size
        # Throughput leaves out the first host loop (it traces and compiles) unless it is
        # the last: images and seconds of the loops counted.
        self._timed = [0, 0.0]
        self._loops = 0
        self._writers = {
            name: tf.summary.create_file_writer(os.path.join(files.private_dir(), name))
            for name in ("train", "eval")
        }

    def log_start(self, trainer, step: int):
        """The log line that opens training: model, method, steps, batch, replicas."""
        accumulation = ""
        if trainer.accumulation_steps > 1:
            accumulation = (
                f" ({trainer.accumulation_steps} accumulated micro-batches of "
                f"{trainer.micro_batch} per replica)"
            )
        logging.info(
            "Training %s (%s) from step %d to %d: %d steps/epoch, effective global batch %d%s "
            "on %d replicas",
            trainer.config.model,
            trainer.config.method,
            step,
            self.train_steps,
            trainer.steps_per_epoch,
            trainer.config.global_batch_size,
            accumulation,
            trainer.strategy.num_replicas_in_sync,
        )

    @property
    def images_per_second(self) -> float | None:
        """Training throughput over the loops counted (see ``__init__``)."""
        images, seconds = self._timed
        return images / seconds if seconds else None

    def log_train(
        self, step: int, steps: int, seconds: float, totals: dict, learning_rate: float
    ) -> dict:
        """One host loop of ``steps`` steps to ``step`` in ``seconds``: its means (from the
        replicas' running ``totals``), written and printed."""
        images = steps * self.global_batch_size
        images_per_second = images / max(seconds, 1e-9)
        if self._loops or step >= self.train_steps:
            self._timed = [self._timed[0] + images, self._timed[1] + seconds]
        self._loops += 1
        seconds_per_step = seconds / steps
        examples = max(totals["examples"], 1.0)
        values = {
            "clean_loss": totals["clean_loss"] / examples,
            "train_top1": totals["clean_correct"] / examples,
            "learning_rate": learning_rate,
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

    def log_evaluation(self, step: int, result: dict):
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

    def close(self):
        """Flushes and closes the writers."""
        for writer in self._writers.values():
            writer.close()


def run_summary(
    trainer, eval_result: dict, last_train: dict, wall_time_s: float, time_to_target
) -> dict:
    """``summary.json`` of ``trainer``'s run: its method and length, its last evaluation and
    training means, throughput and time to the target accuracy (None: not reached)."""
    config = trainer.config
    return {
        "method": config.method,
        "staleness": config.staleness if trainer.ring is not None else 0,
        "global_batch_size": config.global_batch_size,
        "accumulation_steps": trainer.accumulation_steps,
        "train_steps": trainer.train_steps,
        "epochs": trainer.train_steps / trainer.steps_per_epoch,
        "train_top1": None,
        "eval_top1": eval_result.get("top1"),
        "eval_top5": eval_result.get("top5"),
        # Under --eval_attack_eps (None otherwise).
        "eval_robust_top1": eval_result.get("robust_top1"),
        # How the evaluated (and exported) main branch got its BatchNorm statistics.
        "bn_statistics": eval_result.get("bn_statistics"),
        "images_per_second": trainer.summaries.images_per_second,
        "wall_time_s": wall_time_s,
        "final_train_loss": last_train.get("clean_loss"),
        "target_accuracy": config.target_accuracy,
        "time_to_target_s": time_to_target,
    }
