"""Reads the ``imagenet`` training pipeline locally and through a tf.data service
(dispatcher and workers started here) and prints what each read.

With one worker: an epoch from step 0 and a stream resumed at step
``RESUME_AT``. Then a second worker registers: the worker count, the error
of a pipeline built now, and what a pipeline built before it joined delivers
in up to ``MANY`` batches. With both, in fast mode (``--tf_data_service_workers=2``):
two epochs, a stream resumed at ``RESUME_AT``, the tasks each worker ran, and
``main.py`` training two steps through them (its console and run_config.json).

Run by ``test_data_service.py`` inside a private network namespace whose only
interface is loopback: the servers bind every interface of their namespace,
so nothing outside this machine's loopback can reach them.
"""

import json
import os
import subprocess
import sys
import time

import tensorflow as tf

from input_pipeline import data_service
from input_pipeline.base import TRAIN, DataError, PipelineOptions, data_error_from
from input_pipeline.imagenet import ImageNetSource

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
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py"),
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


def dispatcher_gone(data_dir, num_train_examples, dispatcher):
    """``main.py`` training in fast mode when the dispatcher stops: how it ends."""
    console = os.path.join(data_dir, "gone.log")
    with open(console, "w") as log:
        proc = subprocess.Popen(
            main_args(data_dir, num_train_examples, dispatcher.target, "gone_run", 10**6),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            with open(console) as f:
                if "step 2/" in f.read():
                    break
            time.sleep(0.2)
        dispatcher._stop()  # noqa: SLF001
        stopped = time.time()
        code = proc.wait(timeout=PEER_TIMEOUT + 120)
        seconds = time.time() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(console) as f:
        return {"code": code, "seconds": seconds, "console": f.read()}


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
    result["dispatcher_gone"] = dispatcher_gone(data_dir, num_train_examples, dispatcher)
    for worker in workers:
        worker._stop()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
