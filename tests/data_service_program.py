"""Reads the ``imagenet`` training pipeline locally and through a tf.data service
(dispatcher and workers started here) and prints what each read.

With one worker: an epoch from step 0 and a stream resumed at step
``RESUME_AT``. Then a second worker registers: the worker count, the error
of a pipeline built now, and what a pipeline built before it joined delivers
in up to ``MANY`` batches.

Run by ``test_data_service.py`` inside a private network namespace whose only
interface is loopback: the servers bind every interface of their namespace,
so nothing outside this machine's loopback can reach them.
"""

import json
import sys
import time

import tensorflow as tf

from input_pipeline import data_service
from input_pipeline.base import TRAIN, DataError, PipelineOptions, data_error_from
from input_pipeline.imagenet import ImageNetSource

BATCH = 4
RESUME_AT = 3
MANY = 200


def make_source(data_dir, num_train_examples, service=None):
    options = PipelineOptions(seed=5, deterministic=True, tf_data_service=service)
    return ImageNetSource(
        data_dir,
        image_size=32,
        num_classes=10,
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
        "local": read(local.dataset(TRAIN, BATCH), RESUME_AT + epoch_batches),
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
    for worker in workers:
        worker._stop()
    dispatcher._stop()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
