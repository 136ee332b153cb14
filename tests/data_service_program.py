"""Reads the ``imagenet`` training pipeline locally and through a tf.data service
(dispatcher and workers started here) and prints what each read.

With one worker: an epoch from step 0 and a stream resumed at step
``RESUME_AT``. Then a second worker registers: the worker count, the error
of a pipeline built now, and what a pipeline built before it joined delivers
in up to ``MANY`` batches. With both, in fast mode (``--tf_data_service_workers=2``):
two epochs, a stream resumed at ``RESUME_AT``, the tasks each worker ran, and
``main.py`` training two steps through them (its console and run_config.json).
Last, ``main.py`` through a dispatcher and a worker that ``python -m
input_pipeline.service`` started, the dispatcher hung while it trains.

Run by ``test_data_service.py`` inside a private network namespace whose only
interface is loopback: the servers bind every interface of their namespace,
so nothing outside this machine's loopback can reach them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from input_pipeline import data_service
from input_pipeline.base import TRAIN, DataError, PipelineOptions, data_error_from
from input_pipeline.imagenet import ImageNetSource
from tests.child_process import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
RESUME_AT = 3
MANY = 200
#: --peer_timeout of the runs here: the dispatcher's silence that stops a run (seconds).
PEER_TIMEOUT = 5


def make_source(data_dir, num_train_examples, service=None, workers=1):
    options = PipelineOptions(
        seed=5, deterministic=True, tf_data_service=service, tf_data_service_workers=workers
    )
    return ImageNetSource(
        data_dir,
        image_size=32,
        num_classes=num_train_examples,  # each training record's label is its own id
        one_based_labels=True,
        options=options,
        num_train_examples=num_train_examples,
    )


def read(dataset, batches):
    """Labels and per-image pixel sums of up to ``batches`` batches, and the
    one-line message of the error that ended the read early (or None)."""
    labels, checksums, error = [], [], None
    try:
        for images, batch_labels in dataset.take(batches):
            labels.append(batch_labels.numpy().tolist())
            checksums.append(tf.reduce_sum(images, axis=[1, 2, 3]).numpy().tolist())
    except tf.errors.OpError as caught:
        found = data_error_from(caught)
        error = str(found) if found else f"{type(caught).__name__} without a data message"
    return {"labels": labels, "checksums": checksums, "error": error}


def start_worker(service, dispatcher_address):
    return service.WorkerServer(
        service.WorkerConfig(
            dispatcher_address=dispatcher_address, worker_address="localhost:%port%"
        )
    )


def main_args(data_dir, num_train_examples, service, name, steps):
    return [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        "--dataset=imagenet",
        f"--data_dir={data_dir}",
        "--one_based_labels",
        f"--num_classes={num_train_examples}",
        "--image_size=16",
        "--model=resnet8",
        "--width_multiplier=0.25",
        "--method=vanilla",
        f"--batch_size={BATCH}",
        f"--train_steps={steps}",
        "--mode=train",
        "--precise_bn_batches=0",
        f"--tf_data_service={service}",
        "--tf_data_service_workers=2",
        f"--model_dir={os.path.join(data_dir, name)}",
        f"--peer_timeout={PEER_TIMEOUT}",
        "--steps_per_loop=1",
    ]


def train(data_dir, num_train_examples, service):
    """``main.py`` for two steps in fast mode: its exit status, console and input record."""
    model_dir = os.path.join(data_dir, "fast_run")
    proc = subprocess.run(
        main_args(data_dir, num_train_examples, service, "fast_run", 2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    record = None
    if proc.returncode == 0:
        with open(os.path.join(model_dir, "run_config.json")) as f:
            record = json.load(f).get("input_modes")
    return {"code": proc.returncode, "console": proc.stdout + proc.stderr, "input_modes": record}


def serve(log_path, *args):
    """``python -m input_pipeline.service *args`` (a dispatcher or a worker), its output
    in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "input_pipeline.service", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def dispatcher_gone(data_dir, num_train_examples):
    """``main.py`` training through a dispatcher and a worker started by ``python -m
    input_pipeline.service`` (``--tf_data_service_workers=0``: the dispatcher's count, one:
    exact mode), the dispatcher hung (SIGSTOP: its port still accepts connections) at
    step 2: how main.py ends."""
    dispatcher_port, worker_port = free_ports(2)
    logs = [os.path.join(data_dir, f"{name}.log") for name in ("dispatcher", "worker")]
    servers = [
        serve(logs[0], f"--port={dispatcher_port}"),
        serve(
            logs[1],
            f"--dispatcher=localhost:{dispatcher_port}",
            f"--port={worker_port}",
            "--worker_host=localhost",
        ),
    ]
    console = os.path.join(data_dir, "gone.log")
    service = f"grpc://localhost:{dispatcher_port}"
    args = main_args(data_dir, num_train_examples, service, "gone_run", 10**6)
    args[args.index("--tf_data_service_workers=2")] = "--tf_data_service_workers=0"
    proc = None
    try:
        # Both serving (the worker registered) before main.py asks for the count.
        if data_service.count_workers(service, timeout=120) != 1:
            raise RuntimeError("python -m input_pipeline.service: not one worker registered")
        with open(console, "w") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            with open(console) as f:
                if "step 2/" in f.read():
                    break
            time.sleep(0.2)
        servers[0].send_signal(signal.SIGSTOP)
        stopped = time.time()
        code = proc.wait(timeout=PEER_TIMEOUT + 120)
        seconds = time.time() - stopped
    finally:
        for child in [proc, *servers]:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
    with open(console) as f:
        text = f.read()
    with open(os.path.join(data_dir, "gone_run", "run_config.json")) as f:
        record = json.load(f).get("input_modes")
    servers_said = []
    for path in logs:
        with open(path) as f:
            servers_said.append(f.read())
    return {
        "code": code,
        "seconds": seconds,
        "console": text,
        "input_modes": record,
        "servers": servers_said,
    }


def main(data_dir, num_train_examples):
    epoch_batches = num_train_examples // BATCH
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [start_worker(service, address)]
    local = make_source(data_dir, num_train_examples)
    remote = make_source(data_dir, num_train_examples, service=dispatcher.target)
    result = {
        "dispatcher": dispatcher.target,
        "local": read(local.dataset(TRAIN, BATCH), 2 * epoch_batches),
        "remote": read(remote.dataset(TRAIN, BATCH), epoch_batches),
        "resumed": read(remote.dataset(TRAIN, BATCH, start_step=RESUME_AT), epoch_batches),
        "counts": [data_service.count_workers(dispatcher.target)],
        "worker_tasks": workers[0]._num_tasks(),  # noqa: SLF001 - the worker did the reads
    }
    # Built while one worker serves; read after a second one has registered.
    built_before = remote.dataset(TRAIN, BATCH)
    workers.append(start_worker(service, address))
    deadline = time.time() + 60
    while dispatcher._num_workers() < 2 and time.time() < deadline:  # noqa: SLF001
        time.sleep(0.1)
    result["registered"] = dispatcher._num_workers()  # noqa: SLF001
    result["counts"].append(data_service.count_workers(dispatcher.target))
    try:
        remote.dataset(TRAIN, BATCH)
        result["refused"] = None
    except DataError as error:
        result["refused"] = str(error)
    result["two_workers"] = read(built_before, MANY)
    del built_before

    # Fast mode: both workers share each epoch.
    tasks = [worker._num_tasks() for worker in workers]  # noqa: SLF001
    fast = make_source(data_dir, num_train_examples, service=dispatcher.target, workers=2)
    result["fast"] = read(fast.dataset(TRAIN, BATCH), 2 * epoch_batches)
    result["fast_resumed"] = read(
        fast.dataset(TRAIN, BATCH, start_step=RESUME_AT), 2 * epoch_batches - RESUME_AT
    )
    result["fast_tasks"] = [w._num_tasks() - n for w, n in zip(workers, tasks)]  # noqa: SLF001
    result["fast_run"] = train(data_dir, num_train_examples, dispatcher.target)
    for worker in workers:
        worker._stop()
    dispatcher._stop()  # noqa: SLF001
    result["dispatcher_gone"] = dispatcher_gone(data_dir, num_train_examples)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
