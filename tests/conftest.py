"""pytest's view of the suites.

``tf.test.TestCase`` inherits ``test_session``, a context manager of the
TensorFlow 1 API that pytest would collect as a test and report as skipped
("Not a test."): it is left out, so a skip in the summary means something.

Each TensorFlow process of the suite (a pytest worker, and the programs the
tests start, which inherit the environment) runs its kernels on one thread:
the suite runs two workers on two cores, and more threads only make them
wait on each other (measured: 138 s → 114 s for three of the heaviest files).
"""

import os

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    items[:] = [item for item in items if item.name != "test_session"]
