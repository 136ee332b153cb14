"""Distribution-strategy helpers: pick a strategy, connect to a TPU, split a CPU.

TPU: ``--tpu`` names a Cloud TPU (resolved through the Cloud TPU API), gives a
``grpc://HOST:PORT`` address of its worker, or is ``local`` on a TPU VM. The
strategy is made the usual way — resolver, ``experimental_connect_to_cluster``
(not for ``local``), ``initialize_tpu_system``, ``TPUStrategy`` — and any
failure becomes a ``StrategyError`` with the reason in one line. A gRPC
address is probed first, because connecting to an address where nothing
listens blocks instead of failing.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse

import tensorflow as tf

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")

#: ``--all_reduce_alg`` to the collective implementation of MultiWorkerMirroredStrategy.
ALL_REDUCE_ALGORITHMS = ("auto", "ring", "nccl")

#: Seconds to wait for a TPU worker's gRPC port to accept a connection.
TPU_PROBE_TIMEOUT = 10.0


class StrategyError(RuntimeError):
    """The requested strategy cannot be made on this machine; the message is one line."""


def tpu_cluster_resolver(tpu: str) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    """The resolver ``--tpu`` describes: a TPU name, a ``grpc://`` address, or ``local``."""
    if not tpu:
        raise StrategyError("--tpu is empty; give a TPU name, grpc://HOST:PORT or local")
    # A TPU name is looked up through the GCE metadata server with no timeout
    # of its own; bound it, so an unreachable network fails instead of hanging.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TPU_PROBE_TIMEOUT)
    try:
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    except Exception as error:  # the Cloud TPU API lookup raises many kinds
        raise StrategyError(f"cannot resolve --tpu={tpu}: {_one_line(error)}") from None
    finally:
        socket.setdefaulttimeout(previous)


def probe_grpc_address(address: str, timeout: float = TPU_PROBE_TIMEOUT):
    """Raises ``StrategyError`` unless ``grpc://HOST:PORT`` accepts a TCP connection."""
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port:
        raise StrategyError(f"{address!r} is not a grpc://HOST:PORT address")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as error:
        raise StrategyError(f"no TPU worker answers at {address} ({_one_line(error)})") from None


def tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
    """Connects to the TPU ``--tpu`` names and returns a ``TPUStrategy`` over its cores."""
    resolver = tpu_cluster_resolver(tpu)
    master = resolver.master()
    if master.startswith("grpc://"):
        probe_grpc_address(master)
    try:
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as error:
        raise StrategyError(f"cannot start the TPU system ({_one_line(error)})") from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


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


def configure_coordination(resolver, peer_timeout: float, start_timeout: float):
    """TensorFlow's coordination service for the cluster, with our timeouts.

    MultiWorkerMirroredStrategy starts the service itself (on the chief, else
    worker 0) with TensorFlow's defaults when none is configured; configured
    first, it keeps ours: a task whose heartbeats stop for ``peer_timeout``
    seconds is reported to every other task, which aborts its collectives;
    every task waits at a barrier until all have registered, at most
    ``start_timeout`` seconds (TensorFlow's default is an hour), and then
    fails naming the missing ones. The service's own heartbeat replaces the
    strategy's Python health-check thread, which it disables when the service
    is on. There is no public API for this (``tf.config`` has none).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    spec = resolver.cluster_spec()
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
        for job in ("chief", "worker")
        if job in spec.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(spec),
        heartbeat_timeout_in_ms=int(peer_timeout * 1000),
        cluster_register_timeout_in_ms=int(start_timeout * 1000),
        coordinated_jobs=jobs,
    )
    # Without the barrier a task registers alone and the first collective waits forever.
    context.context().coordination_service.cluster_register_with_barrier = True


def multi_worker_strategy(
    all_reduce_alg: str = "auto", peer_timeout: float = 30.0, start_timeout: float = 300.0
):
    """MultiWorkerMirroredStrategy over the cluster in ``TF_CONFIG``.

    Every worker runs the same program; each uses its GPUs (or its CPU as one
    replica). Must be built before anything else touches TensorFlow's devices.
    ``peer_timeout`` and ``start_timeout`` configure the coordination service
    (``configure_coordination``); a cluster not whole within ``start_timeout``
    raises TensorFlow's ``OpError`` from the constructor.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    try:
        json.loads(text or "{}")
    except ValueError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON ({error})") from None
    if not text:
        os.environ.pop("TF_CONFIG", None)  # the resolver reads an empty one as broken JSON
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if not resolver.cluster_spec().jobs:
        raise StrategyError(
            "TF_CONFIG names no cluster; set it on every worker, e.g. "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
            '"task": {"type": "worker", "index": 0}} (BUILD.md, GPU cluster)'
        )
    if resolver.task_type not in ("chief", "worker"):
        raise StrategyError(
            f"TF_CONFIG task type {resolver.task_type!r}: every process must be a chief or worker"
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[all_reduce_alg]
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    spec = resolver.cluster_spec()
    if sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) > 1:
        configure_coordination(resolver, peer_timeout, start_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


def planned_replica_count(name: str, num_cpu_devices: int = 1) -> int | None:
    """The replicas ``get_strategy(name, num_cpu_devices)`` will have on this host, found
    without making the strategy (a process may plan runs of several CPU splits, and its
    devices can be split once); None where only the cluster can tell (TPU, several
    workers)."""
    if name in ("tpu", "multi_worker_mirrored"):
        return None
    gpus = len(tf.config.list_physical_devices("GPU"))
    if name == "one_device":
        return 1
    if name == "default" and gpus <= 1 and num_cpu_devices <= 1:
        return 1
    return gpus or num_cpu_devices


def get_strategy(
    name: str,
    num_cpu_devices: int = 1,
    tpu: str = "local",
    all_reduce_alg: str = "auto",
    peer_timeout: float = 30.0,
    start_timeout: float = 300.0,
):
    """The ``--distribution_strategy`` strategy over this host's devices (or the TPU)."""
    if name == "tpu":
        return tpu_strategy(tpu)
    if name == "multi_worker_mirrored":
        return multi_worker_strategy(all_reduce_alg, peer_timeout, start_timeout)
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
