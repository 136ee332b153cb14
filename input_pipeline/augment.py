"""Image operations of AutoAugment / RandAugment, in plain TensorFlow.

Each op takes and returns a uint8 ``[H, W, 3]`` tensor and works inside
``tf.data`` maps (graph mode). Arguments mean what they mean in Pillow, so a
policy table written for Pillow-based implementations carries over:
``ImageEnhance`` factors (0 = degenerate image, 1 = original, > 1
extrapolates), ``ImageOps.solarize`` thresholds, ``ImageOps.posterize`` bits.

This version holds the point-wise operations; the geometric ones and the
policies are still to come (see BUILD.md).
"""

from __future__ import annotations

import tensorflow as tf


def _as_float(image):
    return tf.cast(image, tf.float32)


def _to_uint8(values):
    """Pillow's conversion of a float result: truncation, clipped to [0, 255]."""
    return tf.cast(tf.clip_by_value(tf.floor(values), 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor):
    """Pillow's ``Image.blend(degenerate, image, factor)``: d + factor·(image − d)."""
    degenerate, image = _as_float(degenerate), _as_float(image)
    return _to_uint8(degenerate + float(factor) * (image - degenerate))


def grayscale(image):
    """Pillow's RGB → L: ITU-R 601-2 luma, rounded (uint8 [H, W, 1])."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    luma = tf.bitwise.right_shift(weighted, 16)
    return tf.cast(luma, tf.uint8)[..., None]


def invert(image):
    return 255 - image


def posterize(image, bits):
    """Keeps the ``bits`` most significant bits of every channel."""
    shift = 8 - int(bits)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold=128):
    """Inverts every value at or above ``threshold``."""
    return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def solarize_add(image, addition=0, threshold=128):
    """Adds ``addition`` to every value below ``threshold``, clipped to [0, 255]."""
    added = tf.clip_by_value(tf.cast(image, tf.int32) + int(addition), 0, 255)
    return tf.where(tf.cast(image, tf.int32) < threshold, tf.cast(added, tf.uint8), image)


def _lookup(image, luts):
    """Applies a per-channel table (int [3, 256]) to a uint8 image."""
    channel = tf.broadcast_to(tf.range(3), tf.shape(image))
    index = tf.stack([channel, tf.cast(image, tf.int32)], axis=-1)
    return tf.cast(tf.gather_nd(luts, index), tf.uint8)


def autocontrast(image):
    """Pillow's ``ImageOps.autocontrast(cutoff=0)``: each channel's [min, max] → [0, 255]."""
    x = tf.cast(image, tf.float64)
    low = tf.reduce_min(x, axis=[0, 1])
    high = tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(high - low, 1.0)
    levels = tf.range(256, dtype=tf.float64)[None, :]
    stretched = tf.clip_by_value(tf.floor(levels * scale[:, None] - (low * scale)[:, None]), 0, 255)
    luts = tf.where((high > low)[:, None], stretched, tf.broadcast_to(levels, [3, 256]))
    return _lookup(image, tf.cast(luts, tf.int32))


def equalize(image):
    """Pillow's ``ImageOps.equalize``: per-channel histogram equalisation."""
    flat = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
    histograms = tf.stack(
        [tf.math.bincount(flat[:, c], minlength=256, maxlength=256) for c in range(3)]
    )
    nonzero = histograms > 0
    # The count of the last non-empty bin, per channel.
    last_index = 255 - tf.argmax(tf.reverse(tf.cast(nonzero, tf.int32), [1]), axis=1)
    last_count = tf.gather(histograms, last_index, batch_dims=1)
    step = (tf.reduce_sum(histograms, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)
    before = tf.cumsum(histograms, axis=1, exclusive=True)
    luts = tf.minimum((safe_step[:, None] // 2 + before) // safe_step[:, None], 255)
    identity = tf.broadcast_to(tf.range(256), [3, 256])
    luts = tf.where((step > 0)[:, None], luts, identity)
    return _lookup(image, luts)


def color(image, factor):
    """``ImageEnhance.Color``: blend with the grey version of the image."""
    return blend(tf.tile(grayscale(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
    """``ImageEnhance.Contrast``: blend with a flat image of the mean grey level."""
    mean = tf.reduce_mean(tf.cast(grayscale(image), tf.float64))
    level = tf.cast(tf.floor(mean + 0.5), tf.uint8)
    return blend(tf.fill(tf.shape(image), level), image, factor)


def brightness(image, factor):
    """``ImageEnhance.Brightness``: blend with black."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image.

    SMOOTH is the 3×3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; like
    Pillow, the one-pixel border keeps the original values.
    """
    x = _as_float(image)
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
    degenerate = tf.where(interior[..., None], degenerate, x)
    return blend(tf.cast(degenerate, tf.uint8), image, factor)
