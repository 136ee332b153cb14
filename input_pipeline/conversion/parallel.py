"""Shards written by ``num_workers`` processes, each writing whole shards, with a
progress line (images/s and ETA) on stderr.

Workers are started with 'spawn' (TensorFlow and fork do not mix); with one
worker the shards are written in this process. Shards already complete from
the same inputs (``shards.completed``) are not written again.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent import futures

from input_pipeline.conversion import shards

_counter = None  # the shared image count, in a worker


def _init(counter):
    global _counter
    _counter = counter


def _add(n):
    with _counter.get_lock():
        _counter.value += n


def _write(args):
    task, out = args
    pending = [0]

    def progress(n):  # shared-counter updates in batches: a lock per image is slow
        pending[0] += n
        if pending[0] >= 16:
            _add(pending[0])
            pending[0] = 0

    result = shards.write(task, out, progress)
    _add(pending[0])
    return result


class Progress:
    """A bar, ``images done/total, images/s, ETA`` at most every ``interval`` seconds."""

    def __init__(self, total: int, shards_total: int, interval: float, stream=sys.stderr):
        self.total, self.shards_total = total, shards_total
        self.interval, self.stream = interval, stream
        self.start = self.last = time.monotonic()

    def show(self, done: int, shards_done: int, force: bool = False):
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 1e7 else "?"
        filled = round(24 * done / max(self.total, 1))
        bar = "[" + "#" * filled + "." * (24 - filled) + "]"
        print(
            f"{bar} {done:,}/{self.total:,} images, {rate:,.1f} images/s, ETA {eta} "
            f"({shards_done}/{self.shards_total} shards)",
            file=self.stream,
            flush=True,
        )


def run(tasks, out: str, num_workers: int, interval: float = 10.0) -> list[shards.Result]:
    """Results of every task, in task order; complete shards are resumed, not rewritten."""
    results = {}
    for task in tasks:
        done = shards.completed(task, out)
        if done is not None:
            results[task.name] = done
    todo = [t for t in tasks if t.name not in results]
    if len(results):
        print(f"resuming: {len(results)} shards already complete", file=sys.stderr)
    progress = Progress(sum(len(t.items) for t in todo), len(todo), interval)
    if num_workers <= 1 or len(todo) <= 1:
        count, finished = [0], [0]

        def tick(n):
            count[0] += n
            progress.show(count[0], finished[0])

        for task in todo:
            results[task.name] = shards.write(task, out, tick)
            finished[0] += 1
    else:
        context = multiprocessing.get_context("spawn")
        counter = context.Value("q", 0)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the workers
        workers = min(num_workers, len(todo))
        with futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init, initargs=(counter,)
        ) as pool:
            pending = {pool.submit(_write, (t, out)): t for t in todo}
            waiting = set(pending)
            while waiting:  # a failed worker raises here (BrokenProcessPool), never hangs
                finished, waiting = futures.wait(waiting, timeout=0.5)
                for future in finished:
                    results[pending[future].name] = future.result()
                progress.show(counter.value, len(todo) - len(waiting))
    if todo:
        progress.show(progress.total, len(todo), force=True)
    return [results[t.name] for t in tasks]
