"""Sharpness of trained weights: the quantity the paper's motivation rests on.

Large-batch training is said to find sharp minima (Keskar et al., ICLR 2017),
and adversarial learning to flatten them. Two standard measures of the
training loss L(θ) around the trained weights θ, both of the main branch with
BatchNorm in inference mode (the statistics evaluation uses), over a fixed
set of clean training images, in float32:

- **The top Hessian eigenvalue** λ of ∇²L(θ), by power iteration on
  Hessian-vector products: v ← Hv/‖Hv‖, λ ≈ vᵀHv, until λ changes by less
  than ``tolerance`` (relative) or ``iterations`` are done. Hv is the
  gradient of ∇L(θ)·v (double backprop with nested tapes): about two gradient
  evaluations. Power iteration finds the eigenvalue of largest magnitude, the
  top one at a trained minimum, where the Hessian is nearly positive.
- **The ε-sharpness** of Keskar et al.: with the box
  C_ε = {z : |z_i| ≤ ε·(|θ_i| + 1)},
  100 · (max_{z ∈ C_ε} L(θ + z) − L(θ)) / (1 + L(θ)),
  the max found by ``steps`` steps of projected sign-gradient ascent from
  z = 0 with step ε·(|θ_i| + 1)/2 (Keskar et al. use L-BFGS-B), the largest
  loss met counted; one gradient evaluation a step.

Under a distribution strategy each replica holds a shard of every batch; the
loss is the all-reduced mean over the whole set (every replica's sum over the
set's size), so its gradient and Hv are the replicas' sums and λ does not
depend on the replica count. Only the variables the loss depends on (the
shared weights and the main branch's γ and β) are perturbed or iterated on.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from flags import sharpness as sharpness_flags
from input_pipeline.base import TRAIN_EVAL
from official import losses
from official.split_batch_norm import call_model, split_layers


@dataclasses.dataclass
class Sharpness:
    """What ``sharpness.json`` records."""

    top_eigenvalue: float
    power_iterations: int
    converged: bool
    eps_sharpness: float
    epsilon: float
    ascent_steps: int
    loss: float
    examples: int
    #: Full gradient evaluations over the set (a Hessian-vector product counts 2).
    gradient_evaluations: int


class TrainingLoss:
    """The mean training loss of ``model`` over a fixed distributed dataset, its gradient
    and its Hessian-vector products, with respect to the variables it depends on.

    ``top_eigenvalue`` and ``eps_sharpness`` take any object with ``variables``,
    ``value_and_gradient()`` and ``hessian_vector_product(v)``.
    """

    def __init__(self, model, strategy, dataset, examples: int, label_smoothing: float = 0.0):
        self.model = model
        self.strategy = strategy
        self.dataset = dataset
        self.examples = int(examples)
        self.label_smoothing = float(label_smoothing)
        auxiliary = {
            id(v)
            for layer in split_layers(model)
            for v in (layer.aux_gamma, layer.aux_beta)
            if v is not None
        }
        #: What the main branch's loss depends on: every trainable variable but the
        #: auxiliary branch's γ and β.
        self.variables = [v for v in model.trainable_variables if id(v) not in auxiliary]
        self._gradient = tf.function(self._gradient_fn)
        self._hvp = tf.function(self._hvp_fn)

    def _replica_loss(self, batch):
        images, labels = batch
        logits = call_model(self.model, images, False, "main")
        per_example = losses.cross_entropy(labels, logits, self.label_smoothing)
        return tf.reduce_sum(per_example) / self.examples  # this replica's share of the mean

    def _sum(self, per_replica):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _gradient_fn(self):
        total = tf.constant(0.0)
        # Tuples: a dataset loop's state is a structure of tensors (a list would be stacked).
        grads = tuple(tf.zeros(v.shape, v.dtype) for v in self.variables)
        for batch in self.dataset:

            def replica(batch):
                with tf.GradientTape() as tape:
                    loss = self._replica_loss(batch)
                return loss, tape.gradient(loss, self.variables)

            loss, batch_grads = self.strategy.run(replica, args=(batch,))
            total += self._sum(loss)
            grads = tuple(g + self._sum(b) for g, b in zip(grads, batch_grads))
        return total, list(grads)

    def _hvp_fn(self, vector):
        products = tuple(tf.zeros(v.shape, v.dtype) for v in self.variables)
        for batch in self.dataset:

            def replica(batch, vector):
                with tf.GradientTape() as outer:
                    with tf.GradientTape() as inner:
                        loss = self._replica_loss(batch)
                    grads = inner.gradient(loss, self.variables)
                    dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
                return outer.gradient(dot, self.variables)

            batch_products = self.strategy.run(replica, args=(batch, vector))
            products = tuple(p + self._sum(b) for p, b in zip(products, batch_products))
        return list(products)

    def value_and_gradient(self) -> tuple[float, list[tf.Tensor]]:
        loss, grads = self._gradient()
        return float(loss), grads

    def hessian_vector_product(self, vector: list[tf.Tensor]) -> list[tf.Tensor]:
        return self._hvp([tf.convert_to_tensor(v) for v in vector])


def _dot(a, b) -> float:
    return float(tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)]))


def top_eigenvalue(
    loss: TrainingLoss, iterations: int = 30, tolerance: float = 1e-3, seed: int = 0
) -> tuple[float, int, bool]:
    """(λ, iterations run, converged) of the Hessian's eigenvalue of largest magnitude."""
    vector = [
        tf.random.stateless_normal(v.shape, [seed, i], dtype=tf.float32)
        for i, v in enumerate(loss.variables)
    ]
    norm = _dot(vector, vector) ** 0.5
    vector = [v / norm for v in vector]
    eigenvalue = None
    for iteration in range(1, iterations + 1):
        product = loss.hessian_vector_product(vector)
        estimate = _dot(vector, product)  # vᵀHv, ‖v‖ = 1
        norm = _dot(product, product) ** 0.5
        if norm == 0.0:
            return 0.0, iteration, True
        vector = [p / norm for p in product]
        if eigenvalue is not None and abs(estimate - eigenvalue) <= tolerance * abs(estimate):
            return estimate, iteration, True
        eigenvalue = estimate
    return eigenvalue, iterations, False


def eps_sharpness(
    loss: TrainingLoss, epsilon: float = 1e-3, steps: int = 10
) -> tuple[float, float]:
    """(ε-sharpness, L(θ)): the largest relative loss increase found in the box C_ε."""
    theta = [tf.convert_to_tensor(v) for v in loss.variables]
    bounds = [epsilon * (tf.abs(t) + 1.0) for t in theta]
    base, grads = loss.value_and_gradient()
    best = base
    offsets = [tf.zeros_like(t) for t in theta]
    try:
        for _ in range(steps):
            offsets = [
                tf.clip_by_value(z + 0.5 * b * tf.sign(g), -b, b)
                for z, b, g in zip(offsets, bounds, grads)
            ]
            for v, t, z in zip(loss.variables, theta, offsets):
                v.assign(t + z)
            value, grads = loss.value_and_gradient()
            best = max(best, value)
    finally:
        for v, t in zip(loss.variables, theta):
            v.assign(t)
    return 100.0 * (best - base) / (1.0 + base), base


def measure(
    loss: TrainingLoss,
    iterations: int = 30,
    tolerance: float = 1e-3,
    epsilon: float = 1e-3,
    steps: int = 10,
    seed: int = 0,
) -> Sharpness:
    """Both measures of ``loss`` at the model's current weights."""
    eigenvalue, run, converged = top_eigenvalue(loss, iterations, tolerance, seed)
    sharpness, base = eps_sharpness(loss, epsilon, steps)
    return Sharpness(
        top_eigenvalue=eigenvalue,
        power_iterations=run,
        converged=converged,
        eps_sharpness=sharpness,
        epsilon=epsilon,
        ascent_steps=steps,
        loss=base,
        examples=loss.examples,
        gradient_evaluations=2 * run + steps + 1,
    )


def clean_training_images(source, strategy, examples: int, batch_size: int):
    """(distributed dataset, count): the first ``examples`` training images with the
    evaluation preprocessing, in their fixed order (never the augmented stream), in
    global batches of ``batch_size``."""
    images = source.dataset(TRAIN_EVAL, batch_size).unbatch().take(examples)
    count = sum(1 for _ in images.map(lambda image, label: label))
    # Shard each global batch among the workers: sharding the record files would give
    # every worker ``examples`` images of its own, below the ``take``.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = images.batch(batch_size).with_options(options)
    return strategy.experimental_distribute_dataset(batches), count


def measure_run(trainer, flags) -> dict:
    """Both measures of a restored ``Trainer``'s model, with its evaluation statistics, as
    ``sharpness.json`` records them (``flags``: the ``--sharpness_*`` values)."""
    dataset, count = clean_training_images(
        trainer.source, trainer.strategy, flags.sharpness_examples, trainer.config.eval_batch_size
    )
    with trainer.evaluator.evaluation_statistics() as bn_statistics:
        loss = TrainingLoss(
            trainer.model, trainer.strategy, dataset, count, trainer.config.label_smoothing
        )
        result = measure(
            loss,
            iterations=flags.sharpness_iterations,
            tolerance=flags.sharpness_tolerance,
            epsilon=flags.sharpness_eps,
            steps=flags.sharpness_steps,
            seed=trainer.config.seed,
        )
    return {
        **dataclasses.asdict(result),
        "global_step": trainer.global_step,
        "precision": "float32",
        "label_smoothing": trainer.config.label_smoothing,
        "bn_statistics": bn_statistics,
        "data": "the first training images, evaluation preprocessing",
        "settings": sharpness_flags.settings(flags),
    }
