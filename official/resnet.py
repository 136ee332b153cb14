"""ResNet v1.5 (ImageNet family) and the small-image ResNets, with split BatchNorm.

ImageNet family (He et al. 2016, v1.5 as in the MLPerf reference): 7×7/2 stem
convolution and 3×3/2 max-pool, then four stages; bottleneck blocks put the
stride in the 3×3 convolution. Small-image family (resnet8, resnet20 … resnet110;
6n + 2 layers): 3×3 stem and three stages of n blocks, widths 16/32/64.
ResNet-8 (one block per stage) is the quickest network that still has
every kind of block and shortcut; the tests use it. Shortcuts are 1×1 projections
(convolution + BatchNorm) wherever the shape changes.

Inputs are float pixels in [0, 255]; the first layer normalises them with
the ImageNet per-channel mean and standard deviation, so an attack budget
stays in pixel units. Every BatchNorm is a ``SplitBatchNormalization``; the
branch a call uses, and whether statistics may update, are chosen around
the call (``official.split_batch_norm.call_model``).

The model is an ordinary functional Keras model, so whatever takes a Keras
model takes it: ``official.model_conversion.plain_model`` turns it into the
exported model of ordinary layers (the main branch), as it does any model.
"""

from __future__ import annotations

import keras
import numpy as np

from official import precision
from official.split_batch_norm import SplitBatchNormalization

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# name -> (block type, blocks per stage)
IMAGENET_FAMILY = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
    "resnet200": ("bottleneck", (3, 24, 36, 3)),
}
SMALL_FAMILY = {f"resnet{6 * n + 2}": n for n in (1, 3, 5, 7, 9, 18)}  # 8, 20, 32, 44, 56, 110
MODEL_NAMES = tuple(IMAGENET_FAMILY) + tuple(SMALL_FAMILY)


def _check_name(name: str):
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def default_image_size(name: str) -> int:
    _check_name(name)
    return 224 if name in IMAGENET_FAMILY else 32


def min_image_size(name: str) -> int:
    """The smallest input whose final feature map is still at least 1×1.

    The ImageNet family halves the size five times (stem, pool, three
    stages), so 32 px is the least that keeps every stage meaningful; the
    small family halves it twice, so 8 px.
    """
    _check_name(name)
    return 32 if name in IMAGENET_FAMILY else 8


def _width(base: int, multiplier: float) -> int:
    return max(1, int(round(base * multiplier)))


class _Builder:
    """Creates the layers of one model with shared conventions.

    Convolution initializers are seeded in creation order: every block's main
    path first, then the projection shortcuts (the order the earlier,
    subclassed model created them in, so a seed gives the same network).
    """

    def __init__(self, bn_momentum, bn_epsilon, bn_group_size, seed):
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.bn_group_size = bn_group_size
        self.seed = seed
        self._count = 0

    def _next_seed(self):
        self._count += 1
        return None if self.seed is None else self.seed * 100_003 + self._count

    def conv(self, filters, kernel, stride=1, name=None):
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=self._next_seed()),
            name=name,
        )

    def bn(self, zero_gamma=False, name=None):
        return SplitBatchNormalization(
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            gamma_initializer="zeros" if zero_gamma else "ones",
            group_size=self.bn_group_size,
            name=name,
        )


class _Block:
    """One residual block's layers: the main path (convolution and BatchNorm pairs, the last
    BatchNorm's γ at zero if ``zero_init_last_bn``) and, where the shape changes, a 1×1
    projection shortcut. ``__call__`` wires them on a Keras tensor."""

    def __init__(self, builder, name, widths, kernels, strides, in_filters, zero_init_last_bn):
        self.name = name
        self.stride = max(strides)
        self.out_filters = widths[-1]
        self.path = [
            (
                builder.conv(w, k, s, name=f"{name}_conv{i + 1}"),
                builder.bn(zero_init_last_bn and i == len(widths) - 1, f"{name}_bn{i + 1}"),
            )
            for i, (w, k, s) in enumerate(zip(widths, kernels, strides))
        ]
        self.needs_projection = self.stride != 1 or in_filters != self.out_filters
        self.builder = builder

    def make_shortcut(self):
        """The projection's layers, created after every block's main path (see _Builder)."""
        self.shortcut = None
        if self.needs_projection:
            self.shortcut = (
                self.builder.conv(
                    self.out_filters, 1, self.stride, name=f"{self.name}_shortcut_conv"
                ),
                self.builder.bn(name=f"{self.name}_shortcut_bn"),
            )

    def __call__(self, x):
        y = x
        for index, (conv, bn) in enumerate(self.path):
            y = bn(conv(y))
            if index < len(self.path) - 1:
                y = keras.layers.ReLU(name=f"{self.name}_relu{index + 1}")(y)
        shortcut = x if self.shortcut is None else self.shortcut[1](self.shortcut[0](x))
        y = keras.layers.Add(name=f"{self.name}_add")([y, shortcut])
        return keras.layers.ReLU(name=f"{self.name}_out")(y)


def _blocks(model_name, builder, width_multiplier, zero_init_last_bn, stem_width):
    """Every block of the network ``model_name``, in order, its layers created."""
    w = width_multiplier
    if model_name in IMAGENET_FAMILY:
        kind, counts = IMAGENET_FAMILY[model_name]
        widths = [_width(f, w) for f in (64, 128, 256, 512)]
    else:
        kind, counts = "basic", (SMALL_FAMILY[model_name],) * 3
        widths = [_width(f, w) for f in (16, 32, 64)]
    blocks, in_filters = [], stem_width
    for stage, (count, filters) in enumerate(zip(counts, widths)):
        for index in range(count):
            stride = 2 if index == 0 and stage > 0 else 1
            if kind == "basic":  # two 3×3, the stride in the first
                path, kernels, strides = (filters, filters), (3, 3), (stride, 1)
            else:  # bottleneck: 1×1 → 3×3 (the stride: v1.5) → 1×1 ×4
                path, kernels, strides = (filters, filters, 4 * filters), (1, 3, 1), (1, stride, 1)
            name = f"stage{stage + 1}_block{index + 1}"
            block = _Block(builder, name, path, kernels, strides, in_filters, zero_init_last_bn)
            blocks.append(block)
            in_filters = block.out_filters
    for block in blocks:
        block.make_shortcut()
    return blocks


def resnet(
    name: str,
    num_classes: int,
    image_size: int | None = None,
    width_multiplier: float = 1.0,
    zero_init_last_bn: bool = True,
    bn_group_size: int = 1,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    seed: int | None = None,
    shortcut: str | None = None,
    dtype_policy: str = "float32",
) -> keras.Model:
    """The split-BatchNorm ResNet ``name`` as a functional Keras model (any input size of at
    least ``min_image_size``; ``image_size`` is checked against it).

    ``dtype_policy`` is a Keras policy name: under ``mixed_bfloat16`` or
    ``mixed_float16`` convolutions and activations compute in 16 bits while
    every variable, BatchNorm's arithmetic and the logits stay float32.
    """
    _check_name(name)
    if shortcut not in (None, "projection"):
        raise ValueError(f"shortcut must be 'projection', got {shortcut!r}")
    size = image_size or default_image_size(name)
    if size < min_image_size(name):
        raise ValueError(f"{name} needs images of at least {min_image_size(name)} px, got {size}")
    builder = _Builder(bn_momentum, bn_epsilon, bn_group_size, seed)
    with precision.policy_scope(dtype_policy):
        imagenet = name in IMAGENET_FAMILY
        stem_width = _width(64 if imagenet else 16, width_multiplier)
        stem_conv = builder.conv(
            stem_width, 7 if imagenet else 3, 2 if imagenet else 1, "stem_conv"
        )
        blocks = _blocks(name, builder, width_multiplier, zero_init_last_bn, stem_width)
        # Any image size, as a convolutional network takes (``size`` only had to be valid).
        images = keras.Input((None, None, 3), name="images", dtype="float32")
        # (x − mean) / std as a per-channel affine map, in float32.
        std = np.asarray(IMAGENET_STD)
        x = keras.layers.Rescaling(
            scale=(1.0 / std).tolist(),
            offset=(-np.asarray(IMAGENET_MEAN) / std).tolist(),
            name="normalize",
            dtype="float32",
        )(images)
        x = keras.layers.ReLU(name="stem_relu")(builder.bn(name="stem_bn")(stem_conv(x)))
        if imagenet:
            x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
        for block in blocks:
            x = block(x)
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
            name="logits",
        )(x)
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(x)
    return keras.Model(images, logits, name=name)
