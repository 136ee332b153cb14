"""ResNet family: parameter counts, output shapes, export, XLA compatibility."""

import os

import numpy as np
import tensorflow as tf

from official import resnet
from official.split_batch_norm import call_model, split_layers


def count_parameters(model):
    """Convolutions, the dense layer and ONE BatchNorm branch (γ, β), as papers count."""
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables if "/aux_" not in v.path)


class ParameterCountTest(tf.test.TestCase):
    def test_published_counts(self):
        for name, classes, expected in [
            ("resnet50", 1000, 25_557_032),
            ("resnet18", 1000, 11_689_512),
            ("resnet20", 10, 272_474),
            # 6n + 2 with n = 1, counted by hand: stem 464, blocks 4,672 + 14,528
            # + 57,728 (the last two with 1×1 projections), classifier 650.
            ("resnet8", 10, 78_042),
        ]:
            model = resnet.resnet(name, classes, image_size=32)
            self.assertEqual(count_parameters(model), expected, name)
            # Both branches exist and have the same shapes.
            aux = [v for v in model.trainable_variables if "/aux_" in v.path]
            main = [v for v in model.trainable_variables if "/main_" in v.path]
            self.assertEqual([v.shape for v in aux], [v.shape for v in main])
            self.assertNotEmpty(aux)

    def test_width_multiplier_scales_widths(self):
        half = resnet.resnet("resnet20", 10, width_multiplier=0.5)
        full = resnet.resnet("resnet20", 10)
        first_half = split_layers(half)[0].main_gamma.shape[0]
        first_full = split_layers(full)[0].main_gamma.shape[0]
        self.assertEqual((first_half, first_full), (8, 16))
        self.assertLess(count_parameters(half), count_parameters(full) / 3)

    def test_unknown_name_and_too_small_images(self):
        with self.assertRaisesRegex(ValueError, "resnet50"):
            resnet.resnet("resnet51", 10)
        with self.assertRaisesRegex(ValueError, "at least 32"):
            resnet.resnet("resnet50", 10, image_size=16)


class OutputShapeTest(tf.test.TestCase):
    def test_output_shapes(self):
        for name in ("resnet18", "resnet20"):
            for size in (32, 64, 224):
                model = resnet.resnet(name, 7, image_size=size, width_multiplier=0.25)
                out = model(
                    tf.zeros([2, size, size, 3]), training=True, bn_branch="aux", update_stats=False
                )
                self.assertEqual(out.shape, (2, 7), (name, size))

    def test_resnet50_output_shape(self):
        model = resnet.resnet("resnet50", 5, image_size=64, width_multiplier=0.25)
        for size in (32, 64):
            self.assertEqual(model(tf.zeros([1, size, size, 3])).shape, (1, 5))

    def test_zero_init_last_gamma_and_normalisation(self):
        model = resnet.resnet("resnet20", 10)
        gammas = [
            layer.main_gamma.numpy() for layer in split_layers(model) if layer.name.endswith("_bn2")
        ]
        self.assertLen(gammas, 9)
        self.assertAllEqual(np.concatenate(gammas), np.zeros(sum(g.size for g in gammas)))
        # The ImageNet mean image normalises to zero.
        mean_image = np.broadcast_to(np.array(resnet.IMAGENET_MEAN, np.float32), (1, 4, 4, 3))
        normalized = model.get_layer("normalize")(mean_image)
        self.assertAllClose(normalized, np.zeros((1, 4, 4, 3)), atol=1e-5)


class CheckpointTest(tf.test.TestCase):
    def test_checkpoint_holds_every_variable(self):
        model = resnet.resnet("resnet20", 10, image_size=16, seed=1)
        for layer in split_layers(model):  # make moving statistics non-default
            layer.main_moving_mean.assign(tf.random.normal(layer.main_moving_mean.shape))
        x = tf.random.uniform([2, 16, 16, 3], 0, 255)
        expected = model(x).numpy()
        path = tf.train.Checkpoint(model=model).write(os.path.join(self.get_temp_dir(), "c"))
        saved = [n for n in tf.train.list_variables(path) if n[0].startswith("model/")]
        self.assertLen(saved, len(model.variables))
        fresh = resnet.resnet("resnet20", 10, image_size=16, seed=2)
        tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
        self.assertAllClose(fresh(x).numpy(), expected, atol=1e-5)


class XlaTest(tf.test.TestCase):
    def test_forward_and_backward_compile(self):
        for name in ("resnet20", "resnet50"):
            model = resnet.resnet(name, 10, image_size=32)
            x = tf.random.uniform([2, 32, 32, 3], 0, 255)

            @tf.function(jit_compile=True)
            def grads(images, model=model):
                with tf.GradientTape() as tape:
                    logits = call_model(model, images, True, "aux", update_stats=True)
                    loss = tf.reduce_sum(logits**2)
                used = [v for v in model.trainable_variables if "/main_" not in v.path]
                return tape.gradient(loss, used)

            out = grads(x)
            self.assertTrue(all(np.all(np.isfinite(g.numpy())) for g in out), name)
            self.assertGreater(max(float(tf.reduce_max(tf.abs(g))) for g in out), 0.0)


if __name__ == "__main__":
    tf.test.main()
