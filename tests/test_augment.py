"""Point-wise augmentation ops against Pillow's ImageOps / ImageEnhance."""

import numpy as np
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from input_pipeline import augment


def natural_image(height, width, seed):
    """Smooth gradients, a few bright and dark blobs, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [60 + 100 * x / width, 40 + 120 * y / height, 90 + 60 * np.sin(x / 7 + y / 11)], -1
    )
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, 10)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(-120, 120, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
        natural_image(32, 48, 1),
        natural_image(27, 41, 2),
        # A narrow range, so autocontrast and equalize have work to do.
        (rng.integers(90, 140, (20, 30, 3))).astype(np.uint8),
    ]


def pillow(fn, image, *args):
    return np.asarray(fn(Image.fromarray(image), *args))


def enhance(cls, image, factor):
    return np.asarray(cls(Image.fromarray(image)).enhance(factor))


class PointwiseOpsTest(tf.test.TestCase):
    def assert_exact(self, ours, reference, msg):
        self.assertAllEqual(ours, reference, msg=msg)

    def assert_within_one_level(self, ours, reference, msg):
        diff = np.abs(ours.astype(int) - reference.astype(int))
        self.assertLessEqual(diff.max(), 1, msg=f"{msg}: max diff {diff.max()}")
        self.assertGreaterEqual(np.mean(diff == 0), 0.99, msg=f"{msg}: exact share")

    def test_integer_exact_ops(self):
        for i, image in enumerate(test_images()):
            t = tf.constant(image)
            self.assert_exact(augment.invert(t).numpy(), pillow(ImageOps.invert, image), i)
            self.assert_exact(
                augment.autocontrast(t).numpy(),
                pillow(ImageOps.autocontrast, image),
                f"autocontrast {i}",
            )
            self.assert_exact(
                augment.equalize(t).numpy(), pillow(ImageOps.equalize, image), f"equalize {i}"
            )
            for bits in (1, 4, 7, 8):
                self.assert_exact(
                    augment.posterize(t, bits).numpy(),
                    pillow(ImageOps.posterize, image, bits),
                    f"posterize {bits}",
                )
            for threshold in (0, 100, 128, 255, 256):
                self.assert_exact(
                    augment.solarize(t, threshold).numpy(),
                    pillow(ImageOps.solarize, image, threshold),
                    f"solarize {threshold}",
                )

    def test_solarize_add_matches_its_definition(self):
        for image in test_images():
            for addition, threshold in [(30, 128), (-40, 200), (110, 256)]:
                x = image.astype(int)
                want = np.where(x < threshold, np.clip(x + addition, 0, 255), x)
                got = augment.solarize_add(tf.constant(image), addition, threshold).numpy()
                self.assertAllEqual(got, want)

    def test_enhance_ops_within_one_grey_level(self):
        pairs = [
            (augment.color, ImageEnhance.Color),
            (augment.contrast, ImageEnhance.Contrast),
            (augment.brightness, ImageEnhance.Brightness),
            (augment.sharpness, ImageEnhance.Sharpness),
        ]
        for i, image in enumerate(test_images()):
            for ours, theirs in pairs:
                for factor in (0.0, 0.3, 1.0, 1.7):
                    got = ours(tf.constant(image), factor).numpy()
                    self.assert_within_one_level(
                        got, enhance(theirs, image, factor), f"{theirs.__name__} {factor} image {i}"
                    )

    def test_ops_run_in_a_dataset_map(self):
        images = np.stack([natural_image(24, 24, s) for s in range(4)])

        def chain(x):
            x = augment.equalize(augment.autocontrast(x))
            return augment.sharpness(augment.contrast(augment.color(x, 1.5), 0.5), 1.8)

        out = [x.numpy() for x in tf.data.Dataset.from_tensor_slices(images).map(chain)]
        self.assertEqual(out[0].dtype, np.uint8)
        self.assertEqual(out[0].shape, (24, 24, 3))


if __name__ == "__main__":
    tf.test.main()
