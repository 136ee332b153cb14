"""Image preprocessing in the MLPerf ResNet reference style, output in pixels.

Train: decode and random-crop in one op (``sample_distorted_bounding_box``,
area 0.08–1, aspect 3/4–4/3, 10 attempts, centre-crop fallback), resize,
random horizontal flip. Eval: centre crop of ratio 0.875, resize. Small
images (≤ 64 px) use pad-and-crop and flip instead. Every function returns
float32 pixels in [0, 255]: normalisation is the model's first layer, so an
attack budget stays in pixel units.
"""

from __future__ import annotations

import tensorflow as tf

CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
EVAL_CROP_RATIO = 0.875
SMALL_IMAGE_LIMIT = 64


def decode_any(image_bytes) -> tf.Tensor:
    """uint8 [H, W, 3] from JPEG or PNG bytes."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decode_cropped(image_bytes, window_fn):
    """Decodes the window ``window_fn(shape)`` once: a fused decode-and-crop for
    JPEG (its header gives the shape without decoding), decode then crop for PNG."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image_bytes)[:2]
        window = tf.stack(window_fn(shape))
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = decode_any(image_bytes)
        return tf.image.crop_to_bounding_box(image, *window_fn(tf.shape(image)[:2]))

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _center_window(shape, ratio):
    height, width = shape[0], shape[1]
    side = tf.cast(ratio * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    return (height - side) // 2, (width - side) // 2, side, side


def random_crop_window(shape, seed=None):
    """A random (y, x, h, w) window by Inception-style sampling, centre crop as fallback."""
    bbox = tf.zeros([1, 0, 4], tf.float32)
    kwargs = dict(
        bounding_boxes=bbox,
        min_object_covered=0.1,
        aspect_ratio_range=CROP_ASPECT,
        area_range=CROP_AREA,
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    size3 = tf.concat([shape, [3]], axis=0)
    if seed is not None:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            size3, seed=seed, **kwargs
        )
    else:
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(size3, **kwargs)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    # sample_distorted_bounding_box returns the whole image when every attempt
    # fails; MLPerf then uses the eval centre crop instead.
    whole = tf.logical_and(tf.equal(height, shape[0]), tf.equal(width, shape[1]))
    center = _center_window(shape, EVAL_CROP_RATIO)
    return tuple(tf.where(whole, c, r) for c, r in zip(center, (offset_y, offset_x, height, width)))


def split_seed(seed):
    """(crop, flip, augment) seeds from one [2] seed, or three Nones."""
    if seed is None:
        return None, None, None
    return tuple(tf.unstack(tf.random.experimental.stateless_split(seed, 3)))


def augment_pixels(image, augment_fn, seed):
    """Runs a uint8 augmentation on float pixels (rounded to the nearest level)."""
    if augment_fn is None:
        return image
    pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.cast(augment_fn(pixels, seed), tf.float32)


def resize(image, image_size):
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.clip_by_value(image, 0.0, 255.0)


def decode_and_random_crop(image_bytes, seed=None):
    """uint8 random crop, decoded in one op for JPEG: the part of training
    preprocessing that reads the bytes (and can fail on a corrupt image)."""
    return _decode_cropped(image_bytes, lambda shape: random_crop_window(shape, seed))


def decode_and_center_crop(image_bytes):
    """uint8 centre crop of ratio 0.875, decoded in one op for JPEG."""
    return _decode_cropped(image_bytes, lambda shape: _center_window(shape, EVAL_CROP_RATIO))


def train_from_crop(crop, image_size: int, flip_seed=None, augment_fn=None, augment_seed=None):
    """Resize, ``augment_fn``, random flip of a decoded crop → float32 [S, S, 3]."""
    image = augment_pixels(resize(crop, image_size), augment_fn, augment_seed)
    if flip_seed is not None:
        return tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.image.random_flip_left_right(image)


def preprocess_for_train(image_bytes, image_size: int, seed=None, augment_fn=None):
    """Random crop (decoded in one op for JPEG), resize, flip → float32 [S, S, 3].

    ``seed`` (shape [2]) makes the crop, flip and augmentation reproducible;
    ``augment_fn(uint8 image, seed) -> uint8 image`` (AutoAugment,
    RandAugment) runs on the resized crop.
    """
    crop_seed, flip_seed, augment_seed = split_seed(seed)
    crop = decode_and_random_crop(image_bytes, crop_seed)
    return train_from_crop(crop, image_size, flip_seed, augment_fn, augment_seed)


def preprocess_for_eval(image_bytes, image_size: int):
    """Centre crop of ratio 0.875 and resize: deterministic."""
    return resize(decode_and_center_crop(image_bytes), image_size)


def small_image_train(image, image_size: int, padding: int = 4, seed=None, augment_fn=None):
    """CIFAR-style: resize to size, pad by ``padding`` (reflect), random crop, flip,
    then ``augment_fn`` as in ``preprocess_for_train``."""
    crop_seed, flip_seed, augment_seed = split_seed(seed)
    image = resize(tf.cast(image, tf.float32), image_size)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    if seed is not None:
        image = tf.image.stateless_random_crop(padded, [image_size, image_size, 3], crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    else:
        image = tf.image.random_crop(padded, [image_size, image_size, 3])
        image = tf.image.random_flip_left_right(image)
    return augment_pixels(image, augment_fn, augment_seed)


def small_image_eval(image, image_size: int):
    return resize(tf.cast(image, tf.float32), image_size)


def eval_from_pixels(image, image_size: int):
    """The evaluation preprocessing of decoded uint8 pixels [H, W, 3] (serving).

    Small images are resized whole; larger ones centre-cropped (0.875) and
    resized — what the record sources do after decoding.
    """
    if image_size <= SMALL_IMAGE_LIMIT:
        return small_image_eval(image, image_size)
    window = _center_window(tf.shape(image)[:2], EVAL_CROP_RATIO)
    return resize(tf.image.crop_to_bounding_box(image, *window), image_size)


def eval_from_bytes(image_bytes, image_size: int):
    """The evaluation preprocessing of encoded JPEG/PNG bytes, as the record sources do it."""
    if image_size <= SMALL_IMAGE_LIMIT:
        return small_image_eval(decode_any(image_bytes), image_size)
    return preprocess_for_eval(image_bytes, image_size)
