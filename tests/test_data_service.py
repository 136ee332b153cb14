"""``--tf_data_service``: the training pipeline through a dispatcher and a worker
on loopback reads the same epoch as the local pipeline."""

import collections
import shutil
import subprocess

import tensorflow as tf

from tests.child_process import run_for_result
from tests.test_input_imagenet import write_imagenet_layout

#: A private network namespace with loopback up and nothing else: the tf.data
#: service servers listen on every interface, and here loopback is the only one.
LOOPBACK_ONLY = (
    *("unshare", "--user", "--map-root-user", "--net", "--"),
    *("sh", "-c", 'ip link set lo up && exec "$@"', "sh"),
)


def loopback_only_available():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True)
    return probe.returncode == 0


class DataServiceTest(tf.test.TestCase):
    def test_service_epoch_matches_local_epoch(self):
        if not loopback_only_available():
            self.skipTest("needs unshare and ip for a loopback-only network namespace")
        data_dir = self.get_temp_dir()
        written = write_imagenet_layout(data_dir)
        result = run_for_result(
            "-m", "tests.data_service_program", data_dir, "20", prefix=LOOPBACK_ONLY
        )
        local, remote = result["local"], result["remote"]
        self.assertStartsWith(result["dispatcher"], "grpc://localhost:")
        self.assertGreaterEqual(result["worker_tasks"], 1)
        # One epoch (20 records) of labels, the same multiset through the service.
        self.assertLen(remote["labels"], 20)
        self.assertEqual(
            collections.Counter(remote["labels"]), collections.Counter(local["labels"])
        )
        self.assertEqual(sum(len(labels) for _, labels in written["train"]), 20)
        # Deterministic mode: the worker ran the same preprocessing, image by image.
        self.assertEqual(remote["labels"], local["labels"])
        self.assertAllClose(remote["checksums"], local["checksums"], rtol=1e-6)


if __name__ == "__main__":
    tf.test.main()
