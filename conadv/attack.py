"""L∞ projected gradient descent in pixel units (the paper's 1-step PGD with random start).

The inner maximisation of eq. (2), max over ‖δ‖∞ ≤ ε of L(θ; x + δ, y), as the
paper approximates it (eq. 3 and 5): x* = x + α·∇ₓL(θ; x, y), here with the
gradient's sign and a random start, projected back into the ε-ball.

Images stay in pixel space [0, 255] until the model's first layer, so ``eps``
and ``step_size`` are the paper's perturbation values P directly. The attack's
forward pass uses batch statistics of the chosen BatchNorm branch — of the
replica's own batch, whatever the BatchNorm group size, so each replica
attacks its own loss and the attack never communicates — and never updates
moving statistics; its gradient is taken with respect to the input only, so
no model variable is read for a gradient nor written.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from official import losses
from official.split_batch_norm import call_model

#: Named, not auto-selected: XLA (hence TPU) and the default CPU/GPU kernels
#: would otherwise pick different generators and draw different random starts.
RNG_ALGORITHM = "philox"

UNTARGETED = "untargeted"
RANDOM_TARGET = "random"


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """What the ``--attack_*`` flags describe."""

    eps: float = 4.0
    step_size: float | None = None  # None: see ``alpha``
    num_steps: int = 1
    random_init: bool = True
    bn_branch: str = "aux"
    target: str = UNTARGETED
    #: The range of a valid input (pixels: [0, 255]); adversarial images are clipped to it.
    input_min: float = 0.0
    input_max: float = 255.0

    def __post_init__(self):
        if not self.input_min < self.input_max:
            raise ValueError(
                f"attack input range must have min < max, got ({self.input_min}, {self.input_max})"
            )
        if self.eps < 0:
            raise ValueError(f"attack eps must be >= 0, got {self.eps}")
        if self.num_steps < 1:
            raise ValueError(f"attack num_steps must be >= 1, got {self.num_steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"attack step_size must be > 0, got {self.step_size}")
        if self.bn_branch not in ("main", "aux"):
            raise ValueError(f"attack bn_branch must be 'main' or 'aux', got {self.bn_branch!r}")
        if self.target not in (UNTARGETED, RANDOM_TARGET):
            raise ValueError(f"attack target must be 'untargeted' or 'random', got {self.target!r}")

    def from_clean_pass(self) -> AttackConfig:
        """This attack as the clean pass's input gradient gives it (``--attack_source
        clean_pass``, ``conadv/free_attack.py``): one step of ``alpha`` from the clean
        image, through the main BatchNorm, untargeted."""
        return dataclasses.replace(
            self, num_steps=1, random_init=False, bn_branch="main", target=UNTARGETED
        )

    @property
    def alpha(self) -> float:
        """The step: ``step_size``, or by default ε for one step (it reaches the
        boundary) and 2.5·ε/K for K > 1 steps (Madry et al.: enough to cross the
        ball and come back within K steps)."""
        if self.step_size is not None:
            return self.step_size
        return self.eps if self.num_steps == 1 else 2.5 * self.eps / self.num_steps


def stateless_uniform(shape, seed, minval: float, maxval: float) -> tf.Tensor:
    """Float32 uniform in [minval, maxval), drawn identically with and without XLA.

    TensorFlow's kernels and XLA agree on the random bits of a named
    generator but turn them into floats differently; so the float is made
    here from the top 24 bits of an int64 draw (exact in float32).
    """
    bits = tf.random.stateless_uniform(
        shape, seed, minval=None, maxval=None, dtype=tf.int64, alg=RNG_ALGORITHM
    )
    top = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 40), 0xFFFFFF)
    fraction = tf.cast(top, tf.float32) * (1.0 / 2**24)
    return minval + (maxval - minval) * fraction


def random_wrong_labels(labels: tf.Tensor, num_classes: int, seed: tf.Tensor) -> tf.Tensor:
    """A uniformly random label different from each true label."""
    shift = tf.random.stateless_uniform(
        tf.shape(labels), seed, minval=1, maxval=num_classes, dtype=labels.dtype, alg=RNG_ALGORITHM
    )
    return (labels + shift) % num_classes


def pgd_attack(
    model,
    images: tf.Tensor,
    labels: tf.Tensor,
    config: AttackConfig,
    seed: tf.Tensor,
    num_classes: int | None = None,
    loss_scale: float = 1.0,
    training: bool = True,
) -> tf.Tensor:
    """Adversarial images within ``eps`` of ``images`` (L∞), clipped to the input range
    (``config.input_min``, ``config.input_max``: [0, 255] for pixels).

    ``seed`` (shape [2], int) makes the random start and the random target
    reproducible: the same images, weights and seed give the same result,
    which is how the tests recompute a stale attack exactly. ``loss_scale``
    multiplies the loss before differentiation (float16: small input
    gradients would otherwise flush to zero before their sign is taken).
    ``training=False`` attacks the model as it is evaluated (moving
    statistics of ``config.bn_branch``), for robust evaluation.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    eps = tf.constant(config.eps, tf.float32)
    lower = tf.maximum(images - eps, config.input_min)
    upper = tf.minimum(images + eps, config.input_max)
    seed = tf.cast(seed, tf.int64)
    start_seed, target_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2, alg=RNG_ALGORITHM)
    )

    x = images
    if config.random_init and config.eps > 0:
        noise = stateless_uniform(tf.shape(images), start_seed, -config.eps, config.eps)
        x = tf.clip_by_value(images + noise, config.input_min, config.input_max)

    targeted = config.target == RANDOM_TARGET
    if targeted:
        if num_classes is None:
            num_classes = int(model.output_shape[-1])
        attack_labels = random_wrong_labels(losses.class_ids(labels), num_classes, target_seed)
    else:
        attack_labels = labels

    # Ascend the true label's loss, or descend the random target's.
    direction = -1.0 if targeted else 1.0
    for _ in range(config.num_steps):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            logits = call_model(
                model, x, training, config.bn_branch, update_stats=False, group_statistics=False
            )
            # A sum, not a mean: only the sign is used, and a mean over a large
            # batch could underflow in low precision.
            loss = tf.reduce_sum(losses.cross_entropy(attack_labels, logits)) * loss_scale
        grad = tape.gradient(loss, x)
        if loss_scale != 1.0:
            # An overflowed pixel gradient has no usable sign: leave that pixel.
            grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
        x = x + direction * config.alpha * tf.sign(grad)
        x = tf.clip_by_value(x, lower, upper)
    return tf.stop_gradient(x)


def linf_distance(adversarial: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Per-example ‖x_adv − x‖∞, shape [N]."""
    return tf.reduce_max(tf.abs(adversarial - images), axis=[1, 2, 3])
