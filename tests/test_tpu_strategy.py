"""--distribution_strategy=tpu: the flag-to-resolver wiring, and the one-line error here.

This machine has no TPU. What can be checked is everything up to the
connection: the resolver each form of --tpu gives, the probe that keeps an
unreachable gRPC address from hanging, and main.py's one-line error.
"""

import socket
import time

import tensorflow as tf

from official import distribute
from tests.child_process import TINY_RESNET, run_main


def _closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TpuResolverTest(tf.test.TestCase):
    def test_grpc_address_becomes_the_master_and_the_worker(self):
        resolver = distribute.tpu_cluster_resolver("grpc://10.1.2.3:8470")
        self.assertEqual(resolver.master(), "grpc://10.1.2.3:8470")
        self.assertEqual(resolver.cluster_spec().as_dict(), {"worker": ["10.1.2.3:8470"]})

    def test_local_is_the_tpu_vm_itself(self):
        resolver = distribute.tpu_cluster_resolver("local")
        self.assertEqual(resolver.master(), "")

    def test_empty_tpu_flag(self):
        with self.assertRaisesRegex(distribute.StrategyError, "--tpu is empty"):
            distribute.tpu_cluster_resolver("")

    def test_unreachable_address_fails_fast_instead_of_hanging(self):
        address = f"grpc://127.0.0.1:{_closed_loopback_port()}"
        start = time.time()
        with self.assertRaisesRegex(
            distribute.StrategyError, f"no TPU worker answers at {address}"
        ):
            distribute.tpu_strategy(address)
        self.assertLess(time.time() - start, distribute.TPU_PROBE_TIMEOUT + 5)

    def test_probe_accepts_a_listening_port(self):
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            distribute.probe_grpc_address(f"grpc://127.0.0.1:{server.getsockname()[1]}")

    def test_probe_rejects_what_is_not_a_grpc_address(self):
        with self.assertRaisesRegex(distribute.StrategyError, "not a grpc://HOST:PORT"):
            distribute.probe_grpc_address("http://127.0.0.1:80")


class TpuMainTest(tf.test.TestCase):
    def _error_line(self, *args):
        proc = run_main("--distribution_strategy=tpu", *TINY_RESNET, *args, expect_ok=False)
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        self.assertNotIn("Traceback", proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("error: --distribution_strategy=tpu: "), last)
        return last

    def test_no_tpu_here_ends_with_one_line(self):
        line = self._error_line("--tpu=local")
        self.assertIn("cannot start the TPU system", line)

    def test_unreachable_tpu_address_names_it(self):
        address = f"grpc://127.0.0.1:{_closed_loopback_port()}"
        line = self._error_line(f"--tpu={address}")
        self.assertIn(f"no TPU worker answers at {address}", line)


if __name__ == "__main__":
    tf.test.main()
