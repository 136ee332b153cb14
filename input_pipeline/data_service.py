"""``--tf_data_service``: training preprocessing on tf.data service workers, in two modes.

**Exact** (``--tf_data_service_workers=1``). The training stream is seeded
epochs laid end to end, opened at the batch of the step a run starts from
(``input_pipeline/epochs.py``). Through the service that stays true only with
one worker, so a pipeline in this mode refuses a service with more than one
(``DataError`` naming the count), and stops a run the moment a second
worker's batches show up in its stream:

- ``parallel_epochs`` (``ShardingPolicy.OFF``), the only mode that needs no
  particular dispatcher setup, has every worker produce the whole stream:
  with two workers every batch arrives about twice (200 batches read through
  two held about 105 distinct ones).
- ``DYNAMIC`` hands the source's elements to whichever worker asks next;
  here the source is the range of epoch numbers, so workers would read whole
  epochs side by side and no batch position is where arithmetic puts it.
- Static sharding (``FILE``, ``DATA``, ``HINT`` with
  ``shard(SHARD_HINT, SHARD_HINT)``) gives each record to one worker, but needs
  the dispatcher started with a fixed worker list (without one, reading fails:
  "Worker ... is not in the workers list"), restarts a restarted worker's
  shard from its beginning, and the reader merges the workers' streams in
  arrival order. Round-robin reads (``num_consumers``) do not fix the order
  either: a worker not ready within 100 ms skips its turn. Faster workers
  then run ahead without bound, so the batches read before step k are not
  the first k of the stream, and a run resumed at step k would re-read some
  and never read others.

One worker on a machine with enough cores keeps exact resume and the
``--deterministic`` order (it runs the same graph as the trainer would).

**Fast** (``--tf_data_service_workers=N``, N > 1; 0: whatever the dispatcher
has at start). Each epoch is a job of its own in ``distributed_epoch`` mode
(``ShardingPolicy.DYNAMIC``): the dispatcher hands the epoch's files, in the
epoch's seeded order, to whichever worker asks next, so any number of workers
share it and every training example is produced once per epoch, in an order
that depends on the workers' speed. Workers send examples, not batches (a
worker's last partial batch would drop examples); the trainer batches them,
across epoch boundaries as locally. A run resumed at step k opens epoch
``k // steps_per_epoch`` anew and takes as many of its examples as the steps
left in it need: the epoch's remaining examples are re-drawn, not the exact
batches an uninterrupted run would have read (``TRADE_OFF``).
"""

from __future__ import annotations

import threading

import tensorflow as tf
from absl import logging

from input_pipeline.base import BAD_RECORD, DataError

#: How to fix a service with several workers, in both errors.
_FIX = (
    "run exactly one tf.data service worker per dispatcher (several would each "
    "produce the whole training stream, so every batch would be read more than once)"
)


def _answer_within(call, timeout: float):
    """``call()``'s result, or ``TimeoutError`` when it has not returned within ``timeout``
    seconds (it goes on in a daemon thread: TensorFlow's tf.data service client waits
    for an unanswering dispatcher without a deadline)."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as error:  # noqa: BLE001 - raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["value"]


def count_workers(service: str, timeout: float | None = None) -> int:
    """Workers of the tf.data service at ``service`` when the call is made.

    A one-element dataset read in ``parallel_epochs`` mode: every worker
    produces all of it, so each worker contributes the element once. Takes
    about a second (the reader's heartbeat); waits while no worker has
    registered, as training would, at most ``timeout`` seconds (None: for
    ever), then a one-line ``DataError``.
    """

    def count():
        with tf.init_scope():  # read eagerly, also when asked inside a function
            probe = tf.data.Dataset.range(1).apply(
                tf.data.experimental.service.distribute(
                    processing_mode="parallel_epochs", service=service
                )
            )
            return int(probe.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))

    if timeout is None:
        return count()
    try:
        return _answer_within(count, timeout)
    except TimeoutError:
        raise DataError(
            f"--tf_data_service={service}: no dispatcher with a worker answered within "
            f"{timeout:g} s (--peer_timeout); start the dispatcher and its workers "
            "(python -m input_pipeline.service, BUILD.md), or leave --tf_data_service out"
        ) from None


def dispatcher_answers(service: str) -> bool:
    """Whether the dispatcher at ``service`` answers one of the tf.data service's own
    RPCs (the metadata of a dataset id no dataset has: it answers "not found"). A hung
    dispatcher, whose port still accepts connections, does not; TensorFlow's client
    retries an unreachable one without a deadline, so the call then blocks: the caller
    times it (``conadv/run/cluster.py``). No public API asks a dispatcher anything; an
    error other than TensorFlow's (this private API changed) is raised."""
    from tensorflow.python.data.experimental.service import _pywrap_server_lib

    protocol, address = service.split("://", 1)
    try:
        _pywrap_server_lib.TF_DATA_GetDataServiceMetadataByID("-1", address, protocol)
    except RuntimeError as error:  # "Failed to get data service metadata: ... not found"
        if "data service metadata" not in str(error):
            raise
    return True


#: The two modes, as run_config.json records them.
EXACT, FAST = "exact", "fast"

#: What fast mode gives up, said at start and recorded in run_config.json.
TRADE_OFF = (
    "every training example once per epoch, in an order that is not reproducible; a "
    "resumed run restarts at its checkpoint's step with that epoch's remaining examples "
    "re-drawn, not at the exact batch"
)


def settle_workers(service: str, workers: int, timeout: float | None = None) -> int:
    """``--tf_data_service_workers``: 1 stays (exact mode: ``distribute`` counts), else
    the count of workers the dispatcher has now (0 asks for it; N > 1 is checked: the
    record says what ran). At most ``timeout`` seconds (``count_workers``)."""
    if workers == 1:
        return workers
    count = count_workers(service, timeout)
    logging.info("The tf.data service at %s has %d workers", service, count)
    if workers and count != workers:
        logging.warning(
            "--tf_data_service_workers=%d but the tf.data service at %s has %d workers now; "
            "fast mode shares each epoch among the workers there are (recorded: %d)",
            workers,
            service,
            count,
            count,
        )
    return count


def mode(workers: int) -> str:
    """The mode ``--tf_data_service_workers`` asks for: 1 the exact stream, else fast (a
    fast-mode dispatcher down to one worker still shares each epoch: once per epoch)."""
    return EXACT if workers == 1 else FAST


def distribute_epoch(epoch: tf.data.Dataset, service: str) -> tf.data.Dataset:
    """One epoch's examples (finite), made by every worker at ``service`` together.

    A job of its own (no job name), ``distributed_epoch``: the epoch's source
    (its files) is split dynamically among the workers, each split read once.
    """
    return epoch.apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
            service=service,
        )
    )


def _in_order(service: str):
    """Passes batch number ``n`` only where ``n`` is due, stripping the number.

    One worker delivers its batches in order (the reader asks a task for one
    element at a time). A second worker starts its own copy at batch 0, and a
    restarted worker starts again from there: either breaks the sequence.
    """

    def check(due, element):
        number, batch = element
        # The address goes into the template itself: a string value would be quoted.
        message = tf.strings.format(
            f"{BAD_RECORD}--tf_data_service={service}: batch {{}} of the stream arrived where "
            "batch {} was due, so a second worker joined or the worker restarted; " + _FIX,
            [number, due],
        )
        with tf.control_dependencies([tf.debugging.Assert(tf.equal(number, due), [message])]):
            return due + 1, tf.nest.map_structure(tf.identity, batch)

    return check


def distribute(
    dataset: tf.data.Dataset, service: str, timeout: float | None = None
) -> tf.data.Dataset:
    """``dataset`` (an endless stream of batches) produced by the one worker at ``service``.

    Raises ``DataError`` when the service has more than one worker; a worker
    that joins later stops the run at its first batch, with the same advice
    (``data_error_from`` finds it in the iterator's error).
    """
    logging.info("Asking the tf.data service at %s how many workers it has", service)
    workers = count_workers(service, timeout)
    if workers > 1:
        raise DataError(f"--tf_data_service={service} has {workers} workers; {_FIX}")
    numbered = dataset.enumerate()
    remote = numbered.apply(
        tf.data.experimental.service.distribute(processing_mode="parallel_epochs", service=service)
    )
    return remote.scan(tf.constant(0, tf.int64), _in_order(service))
