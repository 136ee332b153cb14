"""Image operations of AutoAugment / RandAugment, in plain TensorFlow.

Each op takes and returns a uint8 ``[H, W, 3]`` tensor and works inside
``tf.data`` maps (graph mode). Arguments mean what they mean in Pillow, so a
policy table written for Pillow-based implementations carries over:
``ImageEnhance`` factors (0 = degenerate image, 1 = original, > 1
extrapolates), ``ImageOps.solarize`` thresholds, ``ImageOps.posterize`` bits.

Geometric ops (rotate, shear, translate) are Pillow's
``Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=fill)`` with the
same matrix, run by TensorFlow's projective-transform kernel; ``cutout`` paints
a square of ``fill``. The policies that draw them are in ``augment.py``.
"""

from __future__ import annotations

import math

import tensorflow as tf


def fresh_seed():
    """A random stateless seed (shape [2]) for an op or policy called without one."""
    return tf.random.uniform([2], minval=0, maxval=tf.int32.max, dtype=tf.int32)


def _as_float(image):
    return tf.cast(image, tf.float32)


def _to_uint8(values):
    """Pillow's conversion of a float result: truncation, clipped to [0, 255]."""
    return tf.cast(tf.clip_by_value(tf.floor(values), 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor):
    """Pillow's ``Image.blend(degenerate, image, factor)``: d + factor·(image − d)."""
    degenerate, image = _as_float(degenerate), _as_float(image)
    factor = tf.cast(factor, tf.float32)
    return _to_uint8(degenerate + factor * (image - degenerate))


def grayscale(image):
    """Pillow's RGB → L: ITU-R 601-2 luma, rounded (uint8 [H, W, 1])."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    luma = tf.bitwise.right_shift(weighted, 16)
    return tf.cast(luma, tf.uint8)[..., None]


def identity(image):
    return image


def invert(image):
    return 255 - image


def posterize(image, bits):
    """Keeps the ``bits`` most significant bits of every channel."""
    shift = tf.cast(8 - tf.clip_by_value(tf.cast(bits, tf.int32), 1, 8), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _map_levels(image, tables):
    """Replaces value v of channel c by ``tables[c, v]`` (int [3, 256]) with one gather."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    return tf.gather(tf.reshape(tf.cast(tables, tf.uint8), [-1]), index)


# Point-wise maps below are float arithmetic on exact integer values: on CPU
# that is several times faster than tf.where or a gather over the pixels.


def solarize(image, threshold=128):
    """Inverts every value at or above ``threshold``."""
    x = _as_float(image)
    inverted = tf.cast(x >= tf.cast(threshold, tf.float32), tf.float32)
    return tf.cast(x + inverted * (255.0 - 2.0 * x), tf.uint8)


def solarize_add(image, addition=0, threshold=128):
    """Adds ``addition`` to every value below ``threshold``, clipped to [0, 255]."""
    x = _as_float(image)
    below = tf.cast(x < tf.cast(threshold, tf.float32), tf.float32)
    added = tf.clip_by_value(x + tf.cast(addition, tf.float32), 0.0, 255.0)
    return tf.cast(x + below * (added - x), tf.uint8)


def _channel_histograms(image):
    """int32 [3, 256]: one bincount over value + 256·channel."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
    return tf.reshape(counts, [3, 256])


def autocontrast(image):
    """Pillow's ``ImageOps.autocontrast(cutoff=0)``: each channel's [min, max] → [0, 255].

    Pillow's table entry for value v is ``floor(v·scale − low·scale)``, clipped,
    in double precision; the same expression per pixel gives the same bytes.
    """
    low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    flat = high <= low  # a constant channel stays as it is
    scale = tf.where(flat, tf.ones_like(low), 255.0 / tf.maximum(high - low, 1.0))
    offset = tf.where(flat, tf.zeros_like(low), low * scale)
    x = tf.cast(image, tf.float64)
    return tf.cast(tf.clip_by_value(tf.floor(x * scale - offset), 0.0, 255.0), tf.uint8)


def equalize(image):
    """Pillow's ``ImageOps.equalize``: per-channel histogram equalisation."""
    histograms = _channel_histograms(image)
    nonzero = histograms > 0
    # The count of the last non-empty bin, per channel.
    last_index = 255 - tf.argmax(tf.reverse(tf.cast(nonzero, tf.int32), [1]), axis=1)
    last_count = tf.gather(histograms, last_index, batch_dims=1)
    step = (tf.reduce_sum(histograms, axis=1) - last_count) // 255
    safe_step = tf.maximum(step, 1)
    before = tf.cumsum(histograms, axis=1, exclusive=True)
    luts = tf.minimum((safe_step[:, None] // 2 + before) // safe_step[:, None], 255)
    identity_luts = tf.broadcast_to(tf.range(256), [3, 256])
    luts = tf.where((step > 0)[:, None], luts, identity_luts)
    return _map_levels(image, luts)


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

    SMOOTH is the 3×3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, i.e.
    (3×3 box sum + 4·centre) / 13; like Pillow, the one-pixel border keeps
    the original values.
    """
    x = _as_float(image)
    rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]  # separable box sum, exact in float
    box_sum = rows[:-2] + rows[1:-1] + rows[2:]
    center = x[1:-1, 1:-1]
    smooth = tf.clip_by_value(tf.round((box_sum + 4.0 * center) / 13.0), 0.0, 255.0)
    degenerate = x + tf.pad(smooth - center, [[1, 1], [1, 1], [0, 0]])
    return blend(tf.cast(degenerate, tf.uint8), image, factor)


# --------------------------------------------------------------- geometric ops


_TIE_NUDGE = 1.0 / 1024.0


def _affine(image, matrix, fill):
    """Pillow's ``Image.transform(size, AFFINE, matrix, NEAREST, fillcolor=fill)``.

    Pillow maps the centre of output pixel (x, y) to ``(a·x' + b·y' + c,
    d·x' + e·y' + f)`` with x' = x + ½, y' = y + ½, and takes the input pixel
    the point falls in (floor). TensorFlow's kernel maps integer coordinates
    and rounds, so the offsets are shifted by the half pixel on both ends; a
    small nudge makes exact ties (common: 30°, odd sizes) round like floor
    despite float32. ``fill`` is one grey level or an RGB triple.
    """
    a, b, c, d, e, f = (tf.cast(m, tf.float32) for m in matrix)
    shift = 0.5 - _TIE_NUDGE
    offset_x = 0.5 * (a + b) + c - shift
    offset_y = 0.5 * (d + e) + f - shift
    transform = tf.stack([a, b, offset_x, d, e, offset_y, 0.0, 0.0])[None]
    shape = tf.shape(image)[:2]
    scalar_fill = isinstance(fill, (int, float))

    def warp(pixels, fill_value):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=pixels[None],
            transforms=transform,
            output_shape=shape,
            fill_value=fill_value,
            interpolation="NEAREST",
            fill_mode="CONSTANT",
        )[0]

    if scalar_fill:
        out = warp(image, float(fill))
    else:
        # A per-channel fill: carry a mask channel through the warp and paint
        # where it comes back empty.
        with_mask = tf.concat([image, tf.ones_like(image[..., :1])], axis=-1)
        warped = warp(with_mask, 0.0)
        inside = warped[..., 3:] > 0
        fill_rgb = tf.cast(tf.broadcast_to(tf.convert_to_tensor(fill), [3]), tf.uint8)
        out = tf.where(inside, warped[..., :3], tf.broadcast_to(fill_rgb, tf.shape(image)))
    out.set_shape(image.shape)
    return out


def rotate(image, degrees, fill=128):
    """``Image.rotate(degrees, NEAREST, fillcolor=fill)``: counter-clockwise about the centre."""
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    center_x, center_y = width / 2.0, height / 2.0
    c = -cos * center_x - sin * center_y + center_x
    f = sin * center_x - cos * center_y + center_y
    return _affine(image, (cos, sin, c, -sin, cos, f), fill)


def shear_x(image, level, fill=128):
    """Affine ``(1, level, 0, 0, 1, 0)``: row y moves by ``-level·y`` pixels."""
    return _affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, level, fill=128):
    """Affine ``(1, 0, 0, level, 1, 0)``: column x moves by ``-level·x`` pixels."""
    return _affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def translate_x(image, pixels, fill=128):
    """Affine ``(1, 0, pixels, 0, 1, 0)``: content moves ``pixels`` to the left."""
    return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image, pixels, fill=128):
    """Affine ``(1, 0, 0, 0, 1, pixels)``: content moves ``pixels`` up."""
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def cutout(image, size, fill=128, seed=None):
    """Paints a ``size``×``size`` square (clipped at the border) with ``fill``.

    The square's centre is uniform over the image; its top-left corner is
    ``size // 2`` above and left of the centre. ``seed`` (shape [2]) makes
    the position reproducible.
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if seed is None:
        seed = fresh_seed()
    center = tf.random.stateless_uniform(
        [2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32
    ) % tf.stack([height, width])
    size = tf.cast(size, tf.int32)
    top, left = center[0] - size // 2, center[1] - size // 2
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    fill_rgb = tf.cast(tf.broadcast_to(tf.convert_to_tensor(fill), [3]), tf.uint8)
    return tf.where(inside[..., None], tf.broadcast_to(fill_rgb, tf.shape(image)), image)
