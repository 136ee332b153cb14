"""Distribution-strategy helpers: pick a strategy, split a CPU into logical devices."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored")


def configure_cpu_devices(num_devices: int):
    """Splits the first physical CPU into ``num_devices`` logical devices.

    Lets MirroredStrategy code run and be tested on one CPU. Must happen
    before TensorFlow initialises its devices.
    """
    if num_devices < 1:
        raise ValueError(f"--num_cpu_devices must be >= 1, got {num_devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if (current and len(current) == num_devices) or (not current and num_devices == 1):
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"cannot split the CPU into {num_devices} devices: TensorFlow is already "
            "initialised; configure devices before any other TensorFlow call"
        ) from error


def get_strategy(name: str, num_cpu_devices: int = 1) -> tf.distribute.Strategy:
    """The ``--distribution_strategy`` strategy over this host's devices."""
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default":
        if len(gpus) > 1 or num_cpu_devices > 1:
            return get_strategy("mirrored", num_cpu_devices)
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise ValueError(
        f"unknown distribution strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
    )
