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
stays in pixel units. Every BatchNorm is a ``SplitBatchNormalization``, and
the model's call chooses the branch and whether statistics may update.

Each block writes its forward pass once, as a function of an ``apply``
callback; the training model passes one that calls its own layers with the
branch arguments, and ``plain_inference_model`` one that builds a functional
Keras model of fresh, ordinary layers holding the main branch's weights.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from official import precision
from official.split_batch_norm import (
    SplitBatchNormalization,
    batch_norm_mode,
    check_branch,
    current_mode,
)

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
    """Creates the layers of one model with shared conventions."""

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


class _Block(keras.layers.Layer):
    """A residual block: ``residual`` is written once for both models.

    Subclasses create their layers and set ``out_filters``; the projection
    shortcut (1×1 convolution + BatchNorm) appears wherever the shape changes.
    """

    def __init__(self, builder, stride, out_filters, **kwargs):
        super().__init__(**kwargs)
        self._builder = builder
        self.stride = stride
        self.out_filters = out_filters
        self.shortcut_conv = self.shortcut_bn = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.out_filters:
            self.shortcut_conv = self._builder.conv(
                self.out_filters, 1, self.stride, name="shortcut_conv"
            )
            self.shortcut_bn = self._builder.bn(name="shortcut_bn")

    def forward(self, x, apply):
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = apply(self.shortcut_bn, apply(self.shortcut_conv, x))
        return ops.relu(ops.add(self.residual(x, apply), shortcut))

    def call(self, x, training=False):
        # Every split BatchNorm reads its branch from the enclosing batch_norm_mode.
        def apply(layer, tensor):
            if isinstance(layer, SplitBatchNormalization):
                return layer(tensor, training=training)
            return layer(tensor)

        return self.forward(x, apply)

    def compute_output_shape(self, s):
        size = lambda d: None if d is None else (d + self.stride - 1) // self.stride  # noqa: E731
        return (s[0], size(s[1]), size(s[2]), self.out_filters)


class BasicBlock(_Block):
    """Two 3×3 convolutions (ResNet-18/34 and the small family)."""

    def __init__(self, builder, filters, stride, zero_init_last_bn, **kwargs):
        super().__init__(builder, stride, filters, **kwargs)
        self.conv1 = builder.conv(filters, 3, stride, name="conv1")
        self.bn1 = builder.bn(name="bn1")
        self.conv2 = builder.conv(filters, 3, name="conv2")
        self.bn2 = builder.bn(zero_gamma=zero_init_last_bn, name="bn2")

    def residual(self, x, apply):
        y = ops.relu(apply(self.bn1, apply(self.conv1, x)))
        return apply(self.bn2, apply(self.conv2, y))


class BottleneckBlock(_Block):
    """1×1 → 3×3 (with the stride: v1.5) → 1×1 ×4 (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, builder, filters, stride, zero_init_last_bn, **kwargs):
        super().__init__(builder, stride, filters * self.expansion, **kwargs)
        self.conv1 = builder.conv(filters, 1, name="conv1")
        self.bn1 = builder.bn(name="bn1")
        self.conv2 = builder.conv(filters, 3, stride, name="conv2")
        self.bn2 = builder.bn(name="bn2")
        self.conv3 = builder.conv(self.out_filters, 1, name="conv3")
        self.bn3 = builder.bn(zero_gamma=zero_init_last_bn, name="bn3")

    def residual(self, x, apply):
        y = ops.relu(apply(self.bn1, apply(self.conv1, x)))
        y = ops.relu(apply(self.bn2, apply(self.conv2, y)))
        return apply(self.bn3, apply(self.conv3, y))


class SplitBNResNet(keras.Model):
    """A ResNet whose every BatchNorm has a main and an auxiliary branch.

    ``model(images, training=False, bn_branch="main", update_stats=True,
    group_statistics=True)``, or ``model(images, training)`` inside
    ``batch_norm_mode(...)`` (given arguments set that mode for the call;
    left out, the enclosing mode, by default the same values, holds):
    ``training=False`` normalises with the
    branch's moving statistics; ``training=True`` with batch statistics (of
    the replica's BatchNorm group, or of its own batch if not
    ``group_statistics``), updating that branch's moving statistics only if
    ``update_stats``. The other branch is never touched. ``bn_branch="mixed"``
    sends the first half of the batch through main and the second through
    auxiliary. Images are float pixels; logits are float32 whatever the
    model's dtype policy.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        width_multiplier: float = 1.0,
        zero_init_last_bn: bool = True,
        bn_group_size: int = 1,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        seed: int | None = None,
    ):
        # The model takes float32 pixels; its layers follow the dtype policy
        # in force when they are created (see ``resnet``).
        super().__init__(name=name, dtype="float32")
        _check_name(name)
        self.num_classes = int(num_classes)
        self.width_multiplier = float(width_multiplier)
        builder = _Builder(bn_momentum, bn_epsilon, bn_group_size, seed)
        # (x − mean) / std as a per-channel affine map: an ordinary Keras layer,
        # so the exported model loads without custom objects.
        std = np.asarray(IMAGENET_STD)
        self.normalize = keras.layers.Rescaling(
            scale=(1.0 / std).tolist(),
            offset=(-np.asarray(IMAGENET_MEAN) / std).tolist(),
            name="normalize",
            dtype="float32",
        )
        w = width_multiplier
        if name in IMAGENET_FAMILY:
            kind, counts = IMAGENET_FAMILY[name]
            self.stem_conv = builder.conv(_width(64, w), 7, 2, name="stem_conv")
            self.stem_pool = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")
            widths = [_width(f, w) for f in (64, 128, 256, 512)]
            block_cls = BasicBlock if kind == "basic" else BottleneckBlock
        else:
            counts = (SMALL_FAMILY[name],) * 3
            self.stem_conv = builder.conv(_width(16, w), 3, name="stem_conv")
            self.stem_pool = None
            widths = [_width(f, w) for f in (16, 32, 64)]
            block_cls = BasicBlock
        self.stem_bn = builder.bn(name="stem_bn")
        # Blocks are attributes, not a list: tf.train.Checkpoint follows attributes,
        # and Keras' tracked lists are invisible to it.
        self.num_blocks = 0
        for stage, (count, filters) in enumerate(zip(counts, widths)):
            for index in range(count):
                stride = 2 if index == 0 and stage > 0 else 1
                block = block_cls(
                    builder,
                    filters,
                    stride,
                    zero_init_last_bn,
                    name=f"stage{stage + 1}_block{index + 1}",
                )
                setattr(self, f"block{self.num_blocks}", block)
                self.num_blocks += 1
        self.pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
        self.classifier = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
            name="logits",
        )

    def forward(self, images, apply):
        x = apply(self.normalize, images)
        x = ops.relu(apply(self.stem_bn, apply(self.stem_conv, x)))
        if self.stem_pool is not None:
            x = apply(self.stem_pool, x)
        for index in range(self.num_blocks):
            x = apply(getattr(self, f"block{index}"), x)
        return ops.cast(apply(self.classifier, apply(self.pool, x)), "float32")

    def call(
        self, images, training=False, bn_branch=None, update_stats=None, group_statistics=None
    ):
        # The arguments, where given, set the batch_norm_mode every split BatchNorm reads
        # (the one mechanism a functional model needs too); left out, the enclosing one holds.
        mode = current_mode()
        with batch_norm_mode(
            mode.bn_branch if bn_branch is None else check_branch(bn_branch),
            mode.update_stats if update_stats is None else update_stats,
            mode.group_statistics if group_statistics is None else group_statistics,
        ):

            def apply(layer, tensor):
                if isinstance(layer, (SplitBatchNormalization, _Block)):
                    return layer(tensor, training=bool(training))
                return layer(tensor)

            return self.forward(ops.cast(images, "float32"), apply)

    def split_batch_norm_layers(self) -> list[SplitBatchNormalization]:
        return [
            layer for layer in self._flatten_layers() if isinstance(layer, SplitBatchNormalization)
        ]


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
) -> SplitBNResNet:
    """Builds the split-BatchNorm model, its variables created for ``image_size`` inputs.

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
    with precision.policy_scope(dtype_policy):
        model = SplitBNResNet(
            name,
            num_classes,
            width_multiplier=width_multiplier,
            zero_init_last_bn=zero_init_last_bn,
            bn_group_size=bn_group_size,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            seed=seed,
        )
        model.image_size = size
        # Shortcut layers are created on the first call, so it runs in the scope too.
        model(np.zeros((1, size, size, 3), np.float32))
    return model


def _plain_batch_norm(layer: SplitBatchNormalization, tensor):
    plain = keras.layers.BatchNormalization(
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        name=(layer.path or layer.name).replace("/", "_"),
    )
    out = plain(tensor)
    main = layer.branch_variables("main")
    plain.set_weights(
        [main[key].numpy() for key in ("gamma", "beta", "moving_mean", "moving_variance")]
    )
    return out


def _plain_copy(layer, tensor):
    config = layer.get_config()
    config["name"] = (layer.path or layer.name).replace("/", "_")
    plain = layer.__class__.from_config(config)
    out = plain(tensor)
    plain.set_weights(layer.get_weights())
    return out


def plain_inference_model(model: SplitBNResNet) -> keras.Model:
    """A functional Keras model of ordinary layers holding the main branch's weights.

    This is what is exported: it needs no custom objects to load, and gives
    the split model's evaluation output (main branch, moving statistics).
    """

    def apply(layer, tensor):
        if isinstance(layer, SplitBatchNormalization):
            return _plain_batch_norm(layer, tensor)
        if isinstance(layer, _Block):
            return layer.forward(tensor, apply)
        return _plain_copy(layer, tensor)

    size = getattr(model, "image_size", None)
    inputs = keras.Input((size, size, 3), name="images")
    outputs = model.forward(inputs, apply)
    return keras.Model(inputs, outputs, name=f"{model.name}_inference")
