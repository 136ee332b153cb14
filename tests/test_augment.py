"""Augmentation ops against Pillow; policy tables and their choice probabilities."""

import functools
import math

import numpy as np
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from input_pipeline import augment, image_ops


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


def example_images():
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
        for i, image in enumerate(example_images()):
            t = tf.constant(image)
            self.assert_exact(image_ops.invert(t).numpy(), pillow(ImageOps.invert, image), i)
            self.assert_exact(
                image_ops.autocontrast(t).numpy(),
                pillow(ImageOps.autocontrast, image),
                f"autocontrast {i}",
            )
            self.assert_exact(
                image_ops.equalize(t).numpy(), pillow(ImageOps.equalize, image), f"equalize {i}"
            )
            for bits in (1, 4, 7, 8):
                self.assert_exact(
                    image_ops.posterize(t, bits).numpy(),
                    pillow(ImageOps.posterize, image, bits),
                    f"posterize {bits}",
                )
            for threshold in (0, 100, 128, 255, 256):
                self.assert_exact(
                    image_ops.solarize(t, threshold).numpy(),
                    pillow(ImageOps.solarize, image, threshold),
                    f"solarize {threshold}",
                )

    def test_solarize_add_matches_its_definition(self):
        for image in example_images():
            for addition, threshold in [(30, 128), (-40, 200), (110, 256)]:
                x = image.astype(int)
                want = np.where(x < threshold, np.clip(x + addition, 0, 255), x)
                got = image_ops.solarize_add(tf.constant(image), addition, threshold).numpy()
                self.assertAllEqual(got, want)

    def test_enhance_ops_within_one_grey_level(self):
        pairs = [
            (image_ops.color, ImageEnhance.Color),
            (image_ops.contrast, ImageEnhance.Contrast),
            (image_ops.brightness, ImageEnhance.Brightness),
            (image_ops.sharpness, ImageEnhance.Sharpness),
        ]
        for i, image in enumerate(example_images()):
            for ours, theirs in pairs:
                for factor in (0.0, 0.3, 1.0, 1.7):
                    got = ours(tf.constant(image), factor).numpy()
                    self.assert_within_one_level(
                        got, enhance(theirs, image, factor), f"{theirs.__name__} {factor} image {i}"
                    )

    def test_ops_run_in_a_dataset_map(self):
        images = np.stack([natural_image(24, 24, s) for s in range(4)])

        def chain(x):
            x = image_ops.equalize(image_ops.autocontrast(x))
            return image_ops.sharpness(image_ops.contrast(image_ops.color(x, 1.5), 0.5), 1.8)

        out = [x.numpy() for x in tf.data.Dataset.from_tensor_slices(images).map(chain)]
        self.assertEqual(out[0].dtype, np.uint8)
        self.assertEqual(out[0].shape, (24, 24, 3))


def pillow_fill(fill):
    """Pillow reads an int fillcolor of an RGB image as red only: spell out grey."""
    return (fill,) * 3 if isinstance(fill, int) else tuple(fill)


def pillow_affine(image, matrix, fill):
    fillcolor = pillow_fill(fill)
    out = Image.fromarray(image).transform(
        (image.shape[1], image.shape[0]),
        Image.AFFINE,
        tuple(float(m) for m in matrix),
        resample=Image.NEAREST,
        fillcolor=fillcolor,
    )
    return np.asarray(out)


def pillow_rotation_matrix(width, height, degrees):
    """The matrix Pillow's Image.rotate builds (about the centre, counter-clockwise)."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = width / 2.0, height / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


class GeometricOpsTest(tf.test.TestCase):
    def assert_mostly_equal(self, ours, reference, msg):
        equal = np.all(ours == reference, axis=-1)
        self.assertGreaterEqual(equal.mean(), 0.99, msg=f"{msg}: {equal.mean():.4f} pixels equal")

    def cases(self):
        for i, image in enumerate(example_images()):
            height, width = image.shape[:2]
            for fill in (128, 0, (255, 20, 60)):
                yield i, image, width, height, fill

    def test_shear_and_translate_match_pillow_transform(self):
        for i, image, _, _, fill in self.cases():
            t = tf.constant(image)
            for level in (-0.3, -0.11, 0.17, 0.3):
                self.assert_mostly_equal(
                    image_ops.shear_x(t, level, fill).numpy(),
                    pillow_affine(image, (1, level, 0, 0, 1, 0), fill),
                    f"shear_x {level} image {i} fill {fill}",
                )
                self.assert_mostly_equal(
                    image_ops.shear_y(t, level, fill).numpy(),
                    pillow_affine(image, (1, 0, 0, level, 1, 0), fill),
                    f"shear_y {level} image {i} fill {fill}",
                )
            for pixels in (-13, -4.4, 3, 9.6):
                self.assert_mostly_equal(
                    image_ops.translate_x(t, pixels, fill).numpy(),
                    pillow_affine(image, (1, 0, pixels, 0, 1, 0), fill),
                    f"translate_x {pixels} image {i} fill {fill}",
                )
                self.assert_mostly_equal(
                    image_ops.translate_y(t, pixels, fill).numpy(),
                    pillow_affine(image, (1, 0, 0, 0, 1, pixels), fill),
                    f"translate_y {pixels} image {i} fill {fill}",
                )

    def test_rotate_matches_pillow(self):
        for i, image, width, height, fill in self.cases():
            for degrees in (-30, -7.5, 12, 29, 90):
                ours = image_ops.rotate(tf.constant(image), degrees, fill).numpy()
                matrix = pillow_rotation_matrix(width, height, degrees)
                self.assert_mostly_equal(
                    ours, pillow_affine(image, matrix, fill), f"rotate {degrees} image {i}"
                )
                if degrees != 90:  # Pillow uses an exact transpose for 90
                    rotated = Image.fromarray(image).rotate(
                        degrees, resample=Image.NEAREST, fillcolor=pillow_fill(fill)
                    )
                    self.assert_mostly_equal(ours, np.asarray(rotated), f"Image.rotate {degrees}")

    def test_fill_outside_and_identity_inside(self):
        image = natural_image(20, 30, 5)
        moved = image_ops.translate_x(tf.constant(image), 7, (1, 2, 3)).numpy()
        self.assertAllEqual(moved[:, :-7], image[:, 7:])
        self.assertAllEqual(moved[:, -7:], np.broadcast_to([1, 2, 3], (20, 7, 3)))
        self.assertAllEqual(image_ops.rotate(tf.constant(image), 0.0, 9).numpy(), image)

    def test_cutout_paints_one_clipped_square(self):
        image = natural_image(24, 32, 6)
        for s in range(20):
            seed = tf.constant([s, 7])
            out = image_ops.cutout(tf.constant(image), 10, 77, seed=seed).numpy()
            changed = np.any(out != image, axis=-1)
            painted = np.all(out == 77, axis=-1)
            rows, cols = np.nonzero(painted)
            # The painted set is one axis-aligned rectangle no larger than 10×10 ...
            self.assertLessEqual(rows.max() - rows.min() + 1, 10)
            self.assertLessEqual(cols.max() - cols.min() + 1, 10)
            block = painted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            self.assertTrue(block.all())
            # ... a full one unless clipped by the border, and nothing else changed.
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            if 0 < rows.min() and rows.max() < 23:
                self.assertEqual(height, 10)
            if 0 < cols.min() and cols.max() < 31:
                self.assertEqual(width, 10)
            self.assertFalse(np.any(changed & ~painted))
            again = image_ops.cutout(tf.constant(image), 10, 77, seed=seed).numpy()
            self.assertAllEqual(out, again)


def seeded_plans(plan_fn, draws):
    """``plan_fn(seed)`` for seeds (0, 1), (1, 1), …, stacked as numpy arrays."""
    seeds = tf.data.Dataset.range(draws).map(lambda s: tf.stack([tf.cast(s, tf.int32), 1]))
    plans = next(iter(seeds.map(plan_fn).batch(draws)))
    return {key: value.numpy() for key, value in plans.items()}


class PolicyTest(tf.test.TestCase):
    def test_tables_have_the_papers_sizes(self):
        for policy in (augment.POLICY_V0, augment.POLICY_IMAGENET):
            self.assertLen(policy, 25)
            for sub in policy:
                self.assertLen(sub, 2)
                for name, probability, level in sub:
                    self.assertBetween(probability, 0.0, 1.0)
                    self.assertBetween(level, 0, 10)
                    augment.apply_op(tf.zeros([8, 8, 3], tf.uint8), name, 0.5, tf.constant(False))
        self.assertLen(augment.RANDAUGMENT_OPS, 14)

    def test_subpolicy_choice_and_op_probabilities(self):
        """χ² on 5,000 seeded draws: uniform sub-policies, ops applied with their probability."""
        draws = 5000
        for name, table in (("v0", augment.POLICY_V0), ("imagenet", augment.POLICY_IMAGENET)):
            plan_fn = functools.partial(augment.autoaugment_plan, name)
            plans = seeded_plans(plan_fn, draws)
            index, applied = plans["subpolicy"], plans["apply"]
            counts = np.bincount(index, minlength=25)
            self.assertGreater(stats.chisquare(counts).pvalue, 1e-3, msg=f"{name}: {counts}")
            # Each op's application rate against its probability (binomial z-score).
            for k, sub in enumerate(table):
                for j, (_, probability, _) in enumerate(sub):
                    hits = applied[index == k, j]
                    expected = probability * len(hits)
                    spread = math.sqrt(len(hits) * probability * (1 - probability)) + 1e-9
                    self.assertLess(abs(hits.sum() - expected) / spread, 4.5, msg=f"{name} {k} {j}")
            self.assertBetween(plans["negate"].mean(), 0.47, 0.53)

    def test_randaugment_ops_are_uniform(self):
        ops = seeded_plans(lambda seed: augment.randaugment_plan(2, seed), 3000)["ops"].ravel()
        counts = np.bincount(ops, minlength=14)
        self.assertGreater(stats.chisquare(counts).pvalue, 1e-3, msg=str(counts))

    def test_autoaugment_applies_its_plan(self):
        image = tf.constant(natural_image(24, 24, 9))
        for policy in ("v0", "imagenet"):
            table, full = augment.POLICIES[policy]
            for s in range(12):
                seed = tf.constant([s, 5])
                plan = augment.autoaugment_plan(policy, seed)
                want = image
                for j, (name, _, level) in enumerate(table[int(plan["subpolicy"])]):
                    if plan["apply"][j]:
                        want = augment.apply_op(want, name, level / full, plan["negate"][j])
                got = augment.autoaugment(image, policy, seed)
                self.assertAllEqual(got, want, msg=f"{policy} seed {s}")
                self.assertEqual(got.dtype, tf.uint8)

    def test_randaugment_applies_its_plan(self):
        image = tf.constant(natural_image(24, 24, 10))
        for s in range(12):
            seed = tf.constant([s, 8])
            plan = augment.randaugment_plan(3, seed)
            want = image
            for op, negate in zip(plan["ops"].numpy(), plan["negate"]):
                want = augment.apply_op(want, augment.RANDAUGMENT_OPS[op], 0.9, negate)
            self.assertAllEqual(augment.randaugment(image, 3, 9, seed), want)

    def test_policy_strengths_follow_the_paper_ranges(self):
        image = tf.constant(natural_image(20, 20, 11))
        no = tf.constant(False)
        # Full-strength rotation is Pillow's 30° rotation; level 0 is the identity.
        self.assertAllEqual(
            augment.apply_op(image, "Rotate", 1.0, no), image_ops.rotate(image, 30.0, 128)
        )
        self.assertAllEqual(
            augment.apply_op(image, "Rotate", 1.0, tf.constant(True)),
            image_ops.rotate(image, -30.0, 128),
        )
        self.assertAllEqual(augment.apply_op(image, "ShearX", 0.0, no), image)
        # Posterize: the paper's levels 0..9 give 8,8,7,7,6,6,5,5,4,4 bits.
        bits = [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
        for level, b in enumerate(bits):
            self.assertAllEqual(
                augment.apply_op(image, "Posterize", level / 9, no), image_ops.posterize(image, b)
            )
        self.assertAllEqual(
            augment.apply_op(image, "Solarize", 5 / 9, no),
            image_ops.solarize(image, 256 * 4 / 9),
        )

    def test_policies_in_a_dataset_map_keep_shape_and_dtype(self):
        images = np.stack([natural_image(16, 16, s) for s in range(6)])
        for fn in (
            augment.policy_fn("autoaugment", "imagenet"),
            augment.policy_fn("randaugment", randaugment_layers=2, randaugment_magnitude=15),
        ):
            ds = tf.data.Dataset.from_tensor_slices(images).map(fn)
            for out in ds:
                self.assertEqual(out.dtype, tf.uint8)
                self.assertEqual(out.shape, (16, 16, 3))
        self.assertIsNone(augment.policy_fn("none"))


class AugmentedSourceTest(tf.test.TestCase):
    def test_seeded_augmentation_is_reproducible_and_changes_images(self):
        from input_pipeline.base import TRAIN, PipelineOptions
        from input_pipeline.digits import DigitsSource

        def first_batch(augment):
            options = PipelineOptions(seed=4, augment=augment, randaugment_magnitude=9)
            images, labels = next(iter(DigitsSource(16, options).dataset(TRAIN, 32)))
            return images.numpy(), labels.numpy()

        plain, plain_labels = first_batch("none")
        for setting in ("autoaugment", "randaugment"):
            once, labels = first_batch(setting)
            again, _ = first_batch(setting)
            self.assertAllEqual(labels, plain_labels)  # same examples, same order
            self.assertAllEqual(once, again)  # same seed, same augmentation
            changed = np.mean(np.any(once != plain, axis=(1, 2, 3)))
            self.assertGreater(changed, 0.3, msg=setting)
            self.assertBetween(float(once.min()), 0.0, 255.0)
            self.assertLessEqual(float(once.max()), 255.0)


if __name__ == "__main__":
    tf.test.main()
