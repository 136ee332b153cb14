"""``python -m input_pipeline.benchmark`` runs the real pipelines and reports rates."""

import types

import tensorflow as tf

from input_pipeline import benchmark


class InputBenchmarkTest(tf.test.TestCase):
    def test_rows_and_table_for_each_setting(self):
        values = types.SimpleNamespace(
            dataset="imagenet",
            data_dir=None,
            augment=["none", "autoaugment", "randaugment"],
            autoaugment_policy="imagenet",
            randaugment_layers=2,
            randaugment_magnitude=9.0,
            image_size=48,
            batch_size=4,
            warmup_batches=1,
            batches=2,
            generated_images=8,
            num_classes=10,
            check_decode=True,
        )
        rows = benchmark.run(values)
        self.assertEqual([row["augment"] for row in rows], values.augment)
        for row in rows:
            self.assertGreater(row["images_per_s"], 0.0)
            self.assertAllClose(row["per_core"] * benchmark.cpu_cores(), row["images_per_s"])
        table = benchmark.format_table(rows, values).splitlines()
        self.assertLen(table, 3 + len(rows))
        self.assertIn("autoaugment (imagenet)", table[4])
        values.check_decode, values.augment = False, ["none"]
        self.assertGreater(benchmark.run(values)[0]["images_per_s"], 0.0)


if __name__ == "__main__":
    tf.test.main()
