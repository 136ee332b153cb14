"""Start a tf.data service dispatcher or worker for ``--tf_data_service`` (BUILD.md).

On the dispatcher's host::

    python -m input_pipeline.service --port=5050

on each worker's host (the workers need the dataset's files and ConAdv installed)::

    python -m input_pipeline.service --dispatcher=DISPATCHER_HOST:5050 --port=5051 \\
        --worker_host=THIS_HOST

then train with ``--tf_data_service=grpc://DISPATCHER_HOST:5050`` and, for
several workers, ``--tf_data_service_workers=N``. The server runs until it is
stopped (Ctrl-C, SIGTERM). It listens on every interface of its host: run it
inside the cluster's private network.
"""

from __future__ import annotations

import socket

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS):
    """This program's flags, defined when it runs (``__main__``), not when imported: the
    trainer's flags live in ``flags/``, which ``input_pipeline`` does not import."""
    flags.DEFINE_integer("port", 5050, "Port to listen on.", flag_values=fv)
    flags.DEFINE_string(
        "dispatcher",
        None,
        "HOST:PORT of the dispatcher: start a worker for it. Without it, start a dispatcher.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "worker_host",
        None,
        "A worker's host name as the trainers reach it (default: this host's name).",
        flag_values=fv,
    )


def main(argv):
    del argv
    import tensorflow as tf

    service = tf.data.experimental.service
    if FLAGS.dispatcher is None:
        server = service.DispatchServer(service.DispatcherConfig(port=FLAGS.port))
        print(f"tf.data service dispatcher at {server.target}", flush=True)
    else:
        host = FLAGS.worker_host or socket.getfqdn()
        server = service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=FLAGS.dispatcher,
                worker_address=f"{host}:{FLAGS.port}",
                port=FLAGS.port,
            )
        )
        print(f"tf.data service worker {host}:{FLAGS.port} of {FLAGS.dispatcher}", flush=True)
    logging.info("Serving until stopped")
    server.join()


if __name__ == "__main__":
    define_flags()
    app.run(main)
