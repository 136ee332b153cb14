"""Flag definitions, shipped flagfiles, and validation messages (in-process, fast)."""

import glob
import os

import tensorflow as tf
from absl import flags as absl_flags

import flags as conadv_flags
from flags.validation import FlagError, validate, validate_batch_sizes, validate_bn_group_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*args):
    values = absl_flags.FlagValues()
    conadv_flags.define_all(values)
    values(["prog", *args])
    return values


class FlagfileTest(tf.test.TestCase):
    def test_every_shipped_flagfile_parses_and_validates(self):
        files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.cfg")))
        self.assertGreaterEqual(len(files), 5)
        for path in files:
            values = parse(f"--flagfile={path}")
            if values.data_dir:
                values.data_dir = self.get_temp_dir()
            if values.distribution_strategy == "multi_worker_mirrored":
                # A cluster run needs the shared --model_dir a user passes (BUILD.md).
                values.model_dir = self.get_temp_dir()
            validate(values)

    def test_paper_hyperparameters(self):
        values = parse(f"--flagfile={ROOT}/configs/imagenet_resnet50_32k_conadv.cfg")
        self.assertEqual(
            (values.learning_rate, values.warmup_epochs, values.batch_size, values.attack_eps),
            (35.0, 40.0, 32768, 3.0),
        )

    def test_define_all_is_idempotent(self):
        values = absl_flags.FlagValues()
        conadv_flags.define_all(values)
        conadv_flags.define_all(values)
        values(["prog"])
        self.assertEqual(values.method, "conadv")


class ValidationTest(tf.test.TestCase):
    CASES = [
        (["--batch_size=0"], "--batch_size"),
        (["--attack_eps=-1"], "--attack_eps"),
        (["--attack_eps=300"], "--attack_eps"),
        (["--attack_steps=0"], "--attack_steps"),
        (["--staleness=0"], "--staleness"),
        (["--bn_group_size=-1"], "--bn_group_size"),
        (["--model=resnet51"], "--model"),
        (["--dataset=nope"], "--dataset"),
        (["--dataset=imagenet"], "--data_dir"),
        (["--data_dir=/does/not/exist"], "--data_dir"),
        (["--model=resnet50", "--image_size=16"], "--image_size"),
        (["--model=resnet20", "--image_size=4"], "--image_size"),
        (["--train_steps=0"], "--train_steps"),
        (["--steps_per_loop=0"], "--steps_per_loop"),
        (["--momentum=1.0"], "--momentum"),
        (["--label_smoothing=1.0"], "--label_smoothing"),
        (["--width_multiplier=0"], "--width_multiplier"),
        (["--num_classes=1"], "--num_classes"),
        (["--dataset=synthetic", "--augment=autoaugment"], "--augment"),
        (["--randaugment_magnitude=31"], "--randaugment_magnitude"),
        (["--method=vanilla", "--attack_source=clean_pass"], "--attack_source"),
        (["--sharpness_examples=0"], "--sharpness_examples"),
        (["--sharpness_iterations=0"], "--sharpness_iterations"),
        (["--sharpness_steps=-1"], "--sharpness_steps"),
        (["--sharpness_eps=-0.001"], "--sharpness_eps"),
        (["--sharpness_tolerance=0"], "--sharpness_tolerance"),
        (["--selection_examples=-1"], "--selection_examples"),
        (["--selection_examples=1.5"], "--selection_examples"),
        (["--dataset=synthetic", "--selection_examples=10"], "--selection_examples"),
        (["--selection_seed=3"], "--selection_seed"),
    ]

    def test_each_bad_value_names_its_flag_in_one_line(self):
        for args, flag in self.CASES:
            with self.assertRaises(FlagError, msg=str(args)) as caught:
                validate(parse(*args))
            message = str(caught.exception)
            self.assertIn(flag, message, args)
            self.assertNotIn("\n", message, args)

    def test_defaults_are_valid(self):
        validate(parse())

    def test_staleness_only_matters_for_conadv(self):
        validate(parse("--method=disadv", "--staleness=0"))

    def test_batch_must_split_over_replicas(self):
        validate_batch_sizes(parse("--batch_size=32", "--eval_batch_size=64"), 4)
        with self.assertRaisesRegex(FlagError, "--batch_size=30 is not divisible by the 4"):
            validate_batch_sizes(parse("--batch_size=30"), 4)
        with self.assertRaisesRegex(FlagError, "--eval_batch_size"):
            validate_batch_sizes(parse("--eval_batch_size=6"), 4)

    def test_batch_norm_group_must_tile_the_replicas(self):
        validate_bn_group_size(parse("--bn_group_size=2"), 8)
        validate_bn_group_size(parse("--bn_group_size=0"), 8)
        validate_bn_group_size(parse(), 8)  # default: chosen from the batch
        with self.assertRaisesRegex(FlagError, "--bn_group_size=3 does not divide the 8"):
            validate_bn_group_size(parse("--bn_group_size=3"), 8)

    def test_paper_flagfiles_run_on_tpu_in_bfloat16(self):
        for size in ("32k", "64k", "96k"):
            values = parse(f"--flagfile={ROOT}/configs/imagenet_resnet50_{size}_conadv.cfg")
            self.assertEqual(values.distribution_strategy, "tpu", size)
            self.assertEqual(values.precision, "mixed_bfloat16", size)


if __name__ == "__main__":
    tf.test.main()
