"""Evaluation of the main branch: the clean top-1 the paper reports (Tables 1–5), robust
accuracy under PGD, predictions, and the export, all with the evaluation statistics.

The paper evaluates the network with its main BatchNorm only (the auxiliary
branch exists for training, as in AdvProp). The statistics that branch
normalises with are, by default, *precise* (Wu & Johnson, 2021): the
population statistics of training images (with the evaluation
preprocessing) under the current weights, computed once per global step
(``official/precise_bn.py``), instead of the moving averages training keeps;
the moving averages are put back afterwards, so evaluating never changes
what training (or a resumed run) computes.
"""

from __future__ import annotations

import contextlib
import os

import tensorflow as tf
from absl import logging

from conadv import attack as attack_lib
from conadv.run import export as export_lib
from conadv.run.metrics import ReplicaSums
from input_pipeline.base import EVAL, SELECTION, TRAIN_EVAL, DataError, DataSource
from official import losses, precision
from official import split_batch_norm as bn_lib
from official.precise_bn import PreciseBatchNorm

EVAL_SUMS = ("examples", "loss", "top1", "top5", "robust_loss", "robust_top1", "robust_top5")


class Evaluator:
    """Evaluates, predicts with and exports the main branch of one run's model.

    ``config`` is the run's ``TrainConfig`` (evaluation batch, robust attack,
    precise-BatchNorm batches, seed, XLA); ``micro_batch`` is the examples per
    replica of one training forward pass (precise statistics are taken over
    batches of that size, as training normalises); ``global_step()`` gives the
    step the statistics belong to.
    """

    def __init__(
        self,
        model,
        strategy: tf.distribute.Strategy,
        source: DataSource,
        config,
        micro_batch: int,
        global_step,
    ):
        self.model = model
        self.strategy = strategy
        self.source = source
        self.config = config
        self.micro_batch = micro_batch
        self.global_step = global_step
        self.compute_dtype = precision.compute_dtype(config.precision)
        with strategy.scope():
            self.sums = ReplicaSums(EVAL_SUMS, name="eval_sums")
        self.precise_bn = PreciseBatchNorm(model, strategy)
        self._precise_cache = None  # (step, PreciseStatistics) of the latest computation
        self._replica_step = tf.function(self._replica, jit_compile=config.jit_compile)
        self._loop = tf.function(self._loop_fn)
        self._eval_datasets = {}  # per split, batches of eval_batch_size
        self._precise_dataset = None  # training images, batches of the training micro-batch

    # ----------------------------------------------------------- statistics

    def precise_statistics(self):
        """The precise statistics at the current step (None if ``precise_bn_batches`` is 0).

        Computed once per step, with collectives across every worker: under
        several workers each must call this before only the chief exports.
        """
        batches = self.config.precise_bn_batches
        if batches <= 0:
            return None
        step = self.global_step()
        if self._precise_cache is None or self._precise_cache[0] != step:
            if self._precise_dataset is None:
                self._precise_dataset = self.source.distribute(
                    self.strategy, TRAIN_EVAL, self.micro_batch * self.strategy.num_replicas_in_sync
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

        The precise statistics come from the training images with the
        *evaluation* preprocessing (the ``TRAIN_EVAL`` split): they describe
        the inputs the evaluated network is given, without looking at the
        evaluation set. Yields what ``summary.json`` and ``eval.json`` record
        as ``bn_statistics``. ``precise=False`` keeps the moving averages.
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

    # ----------------------------------------------------------- evaluation

    def _replica(self, batch):
        images, labels = batch
        # The last step of a pass leaves a replica no examples when the pass has fewer
        # per-replica batches than a multiple of the replica count; that replica adds
        # nothing (a convolution of an empty batch fails on the CPU).
        tf.cond(
            tf.size(labels) > 0,
            lambda: self._replica_sums(images, labels),
            lambda: tf.group(),
        )

    def _replica_sums(self, images, labels):
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
        return self.sums.add(examples=tf.size(labels), **values)

    def _loop_fn(self, dataset):
        for batch in dataset:
            self.strategy.run(self._replica_step, args=(batch,))

    def evaluate(self, split: str = EVAL, precise: bool = True) -> dict:
        """Main-branch accuracy over one pass of ``split`` (``evaluation_statistics``)."""
        if split not in self._eval_datasets:
            self._eval_datasets[split] = self.source.distribute(
                self.strategy, split, self.config.eval_batch_size
            )
        self.sums.reset()
        with self.evaluation_statistics(precise) as bn_statistics:
            self._loop(self._eval_datasets[split])
        totals = self.sums.totals()
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

    def export(self, export_dir: str | None = None) -> dict:
        """The main branch as ``model.keras`` and a serving SavedModel
        (``conadv/run/export.py``), with the evaluation statistics."""
        config = self.config
        export_dir = export_dir or config.export_dir or os.path.join(config.model_dir, "export")
        with self.evaluation_statistics():
            return export_lib.export_model(
                self.model, export_dir, self.source.image_size, self.source.class_names
            )


def summary_evaluations(evaluator: Evaluator, eval_result: dict) -> dict:
    """What ``summary.json`` reports of evaluation: the last evaluation (made now if the run
    was resumed at its end and trained nothing), training-set top-1 and, beside precise
    statistics, what the moving averages alone would have given."""
    if not eval_result:
        eval_result = evaluator.evaluate(EVAL)
    values = {
        "eval_top1": eval_result["top1"],
        "eval_top5": eval_result["top5"],
        "eval_robust_top1": eval_result.get("robust_top1"),
        "bn_statistics": eval_result["bn_statistics"],
        "train_top1": evaluator.evaluate(TRAIN_EVAL)["top1"],
    }
    if values["bn_statistics"]["kind"] == "precise":
        values["eval_top1_moving_average"] = evaluator.evaluate(EVAL, precise=False)["top1"]
    values.update(selection_evaluation(evaluator))
    return values


def selection_evaluation(evaluator: Evaluator) -> dict:
    """The run on its selection set (``--selection_examples``), as evaluated: what a study
    chooses its learning rate by. Empty without a selection set."""
    source = evaluator.source
    if source.selection is None:
        return {}
    result = evaluator.evaluate(SELECTION)
    examples = int(result["examples"])
    expected = source.num_selection_examples
    skipping = source.options.skip_corrupt_records  # skipped records are not read
    if examples > expected or (examples < expected and not skipping):
        raise DataError(
            f"--selection_examples: the selection set read {examples} examples, not the "
            f"{expected} held out of training, so it is not the part this run was trained "
            "without; train the run again in a new --model_dir"
        )
    return {
        "selection_top1": result["top1"],
        "selection_top5": result["top5"],
        "selection_loss": result["loss"],
        "selection_examples": int(result["examples"]),
        "selection_rule": source.selection.describe(),
    }
