"""Every preset in ``configs/`` passes ``--mode=dry_run`` (no TPU, cluster or data), and
what it prints is what its flags imply."""

import contextlib
import glob
import io
import math
import os
import re

import tensorflow as tf

from conadv.run_config import RunConfig
from conadv.studies import dry_run
from flags.validation import FlagError
from tests.child_process import run_main
from tests.test_flags import ROOT, parse

PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "imagenet_*.cfg")))


def expected_group(micro_batch, replicas, minimum=64):
    """The smallest number of replicas whose micro-batches reach ``minimum`` examples
    and that divides the replica count (all replicas if none does), written out
    here independently of official/split_batch_norm.py."""
    if micro_batch >= minimum or replicas == 1:
        return 1
    for size in range(math.ceil(minimum / micro_batch), replicas + 1):
        if replicas % size == 0:
            return size
    return replicas


class PresetDryRunTest(tf.test.TestCase):
    def dry_run(self, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = dry_run.describe(RunConfig.from_flags(parse(*args, "--mode=dry_run")))
        return result, out.getvalue()

    def test_every_preset_prints_what_its_flags_imply(self):
        self.assertLen(PRESETS, 15)  # 3 sizes x (AA or not) x (TPU, GPU) + 2 vanilla + 1 host
        kinds = set()
        for path in PRESETS:
            values = parse(f"--flagfile={path}")
            result, printed = self.dry_run(f"--flagfile={path}")
            name = os.path.basename(path)
            replicas, accumulation = values.num_replicas, values.accumulation_steps
            self.assertIsNotNone(replicas, name)  # a dry run needs no TPU or cluster
            per_replica = values.batch_size // replicas
            micro = per_replica // accumulation
            self.assertEqual(values.batch_size, per_replica * replicas, name)
            self.assertIn(
                f"per replica: {per_replica} examples per step, {micro} per forward pass",
                printed,
                name,
            )
            group = expected_group(micro, replicas)
            self.assertIn(
                f"BatchNorm group: {group} replica(s) x {micro} = {group * micro} examples",
                printed,
                name,
            )
            self.assertGreaterEqual(group * micro, 64, name)  # the paper's >= 64 per statistic
            self.assertEqual(result["steps_per_epoch"], 1_281_167 // values.batch_size, name)
            self.assertEqual(result["train_steps"], round(90 * result["steps_per_epoch"]), name)
            self.assertAlmostEqual(
                result["learning_rates"][result["warmup_steps"]], values.learning_rate, 4
            )
            if values.method == "conadv":
                # τ·N micro-batches of clean and adversarial images, and labels.
                pixels = values.staleness * accumulation * micro * 224 * 224 * 3
                dtype_bytes = 4 if values.precision == "float32" else 2
                labels = values.staleness * accumulation * micro * 4
                self.assertEqual(
                    result["ring_buffer_bytes_per_replica"], 2 * pixels * dtype_bytes + labels
                )
            self.assertEqual(result["inference_parameters"], 25_557_032, name)  # ResNet-50
            kinds.add(values.distribution_strategy)
        self.assertEqual(kinds, {"tpu", "multi_worker_mirrored", "mirrored"})

    def test_a_preset_with_the_wrong_replica_count_is_the_real_run_s_error(self):
        path = os.path.join(ROOT, "configs", "imagenet_resnet50_32k_conadv.cfg")
        with self.assertRaisesRegex(FlagError, "--batch_size=32768 is not divisible by the 3 "):
            self.dry_run(f"--flagfile={path}", "--num_replicas=3")
        with self.assertRaisesRegex(FlagError, "needs --num_replicas"):
            parse_only = parse(f"--flagfile={path}", "--mode=dry_run")
            parse_only.num_replicas = None
            dry_run.describe(RunConfig.from_flags(parse_only))

    def test_main_dry_run_exits_zero_without_data_or_devices(self):
        path = os.path.join(ROOT, "configs", "imagenet_resnet50_96k_conadv_gpu_cluster.cfg")
        proc = run_main(f"--flagfile={path}", "--mode=dry_run")
        self.assertEqual(proc.returncode, 0)
        self.assertRegex(proc.stdout, r"global batch: 98304 = 1536 replicas x 64 per replica")
        self.assertTrue(re.search(r"ring buffer: \d+ bytes per replica", proc.stdout))


if __name__ == "__main__":
    tf.test.main()
