"""Packaging for ConAdv.

TensorFlow is chosen by an extra because TPU VMs, GPU hosts and CPU machines
each need a different wheel: ``pip install -e .[cpu]``, ``.[gpu]`` or ``.[tpu]``.
"""

from setuptools import find_packages, setup

COMMON = [
    "absl-py>=1.0",
    "numpy>=1.23",
    "scikit-learn>=1.2",  # ships the embedded default dataset (handwritten digits)
    "tensorboard>=2.16",  # tf.summary scalars, the HParams dashboard of a sweep
    "matplotlib>=3.7",  # the studies' and the benchmark's plots
]

EXTRAS = {
    "cpu": ["tensorflow-cpu>=2.16"],
    "gpu": ["tensorflow[and-cuda]>=2.16"],
    "tpu": ["tensorflow-tpu>=2.16"],
    # importlib_resources: tensorflow-datasets needs it for builders defined
    # outside its package (a user's own dataset, the tests' tiny dataset).
    "tfds": ["tensorflow-datasets>=4.9", "importlib_resources"],
    # --mlperf_log: the MLPerf log format and its compliance checker.
    "mlperf": ["mlperf-logging>=4.0"],
    "test": [
        "pytest>=7",
        "pytest-xdist>=3",
        "pillow>=9",
        "ruff>=0.5",
        "scipy",  # chi-square test of the augmentation policies
        "tensorflow-datasets>=4.9",
        "importlib_resources",
        "mlperf-logging>=4.0",
    ],
}

setup(
    name="conadv",
    version="0.1.0",
    description=(
        "Concurrent Adversarial Learning for Large-Batch Training (ICLR 2022) "
        "in TensorFlow 2 / Keras 3"
    ),
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*"]),  # every package but the tests
    py_modules=["main"],
    install_requires=COMMON,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "conadv-train=main:run",
            "conadv-benchmark=conadv.studies.commands:benchmark",
            "conadv-experiments=conadv.studies.commands:experiments",
            "conadv-bn-study=conadv.studies.commands:bn_study",
        ]
    },
)
