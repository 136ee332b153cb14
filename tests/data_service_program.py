"""Reads one epoch of the ``imagenet`` training pipeline locally and through a
tf.data service (dispatcher and worker started here) and prints both.

Run by ``test_data_service.py`` inside a private network namespace whose only
interface is loopback: the servers bind every interface of their namespace,
so nothing outside this machine's loopback can reach them.
"""

import json
import sys

import tensorflow as tf

from input_pipeline.base import TRAIN, PipelineOptions
from input_pipeline.imagenet import ImageNetSource

BATCH = 4


def read_epoch(data_dir, num_train_examples, service=None):
    options = PipelineOptions(seed=5, deterministic=True, tf_data_service=service)
    source = ImageNetSource(
        data_dir,
        image_size=32,
        num_classes=10,
        one_based_labels=True,
        options=options,
        num_train_examples=num_train_examples,
    )
    batches = source.num_train_examples // BATCH
    labels, checksums = [], []
    for images, batch_labels in source.dataset(TRAIN, BATCH).take(batches):
        labels += batch_labels.numpy().tolist()
        checksums += tf.reduce_sum(images, axis=[1, 2, 3]).numpy().tolist()
    return {"labels": labels, "checksums": checksums}


def main(data_dir, num_train_examples):
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    dispatcher_address = dispatcher.target.split("://")[1]
    worker = service.WorkerServer(
        service.WorkerConfig(
            dispatcher_address=dispatcher_address, worker_address="localhost:%port%"
        )
    )
    local = read_epoch(data_dir, num_train_examples)
    remote = read_epoch(data_dir, num_train_examples, service=dispatcher.target)
    result = {
        "local": local,
        "remote": remote,
        "dispatcher": dispatcher.target,
        "worker_tasks": worker._num_tasks(),  # noqa: SLF001 - the test checks the worker ran
    }
    worker._stop()
    dispatcher._stop()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
