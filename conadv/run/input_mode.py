"""How the training input is made, said at start and kept in ``run_config.json``.

With ``--tf_data_service`` the run's input is in one of two modes
(``input_pipeline/data_service.py``): *exact*, one service worker making the
seeded stream (a resumed run reads the very batches an uninterrupted run
would), or *fast*, several workers sharing each epoch (every example once per
epoch, in an order that is not reproducible; a resume re-draws the rest of
its epoch). What a run can promise about its data order depends on the modes
it was trained in, so the chief of each start whose mode differs from the
last recorded one says so in one line and appends it to ``input_modes`` in
``run_config.json``: ``mode``, ``tf_data_service``, ``workers`` (as asked),
``registered`` (the workers the dispatcher had at start, fast mode),
``from_step`` (the checkpoint the start resumes from, 0 for a new run) and,
for the fast mode, ``trade_off``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from conadv.run import run_identity
from conadv.run.checkpoints import resumable_step
from conadv.run.run_files import write_json
from input_pipeline import data_service

#: The mode of a run without the service.
LOCAL = "local"


def settle(run) -> tuple:
    """``run`` with ``--tf_data_service_workers=0`` replaced by the dispatcher's count, and
    the count of workers the dispatcher has now in fast mode (None: exact or local). At
    most ``--peer_timeout`` seconds (then a one-line ``DataError``)."""
    pipeline = run.data.pipeline
    if not pipeline.tf_data_service or pipeline.tf_data_service_workers == 1:
        return run, None
    registered = data_service.settle_workers(
        pipeline.tf_data_service, pipeline.tf_data_service_workers, pipeline.peer_timeout
    )
    if pipeline.tf_data_service_workers == 0:
        pipeline = dataclasses.replace(pipeline, tf_data_service_workers=registered)
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, pipeline=pipeline))
    return run, registered


def current(run, registered: int | None = None) -> dict:
    """This start's input mode, as recorded."""
    pipeline = run.data.pipeline
    if not pipeline.tf_data_service:
        return {"mode": LOCAL}
    workers = pipeline.tf_data_service_workers
    entry = {
        "mode": data_service.mode(workers),
        "tf_data_service": pipeline.tf_data_service,
        "workers": workers,
    }
    if entry["mode"] == data_service.FAST:
        entry["registered"] = registered
        entry["trade_off"] = data_service.TRADE_OFF
    return entry


def say_and_record(run, registered: int | None = None) -> dict | None:
    """The chief's: a fast-mode start says its trade-off in one line; a start whose mode
    differs from the last recorded one (a service run's first) is appended to
    ``input_modes``. Returns the entry appended, or None."""
    entry = current(run, registered)
    if entry["mode"] == data_service.FAST:
        print(
            f"note: --tf_data_service={entry['tf_data_service']} with {registered} "
            f"workers, fast mode: {data_service.TRADE_OFF}; recorded in "
            f"{run_identity.RUN_CONFIG}",
            flush=True,
        )
    path = os.path.join(run.model_dir, run_identity.RUN_CONFIG)
    with tf.io.gfile.GFile(path) as f:
        stored = json.load(f)
    modes = stored.get("input_modes") or []
    last = modes[-1] if modes else {"mode": LOCAL}
    same = ("mode", "tf_data_service", "workers")
    if all(last.get(k) == entry.get(k) for k in same):
        return None
    # The step this start resumes from, as the restart decides it (every worker's state).
    entry["from_step"] = max(resumable_step(run.model_dir), 0)
    stored["input_modes"] = [*modes, entry]
    write_json(path, stored)
    return entry
