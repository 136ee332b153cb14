"""``--tf_data_service``: through one worker on loopback the training pipeline
reads the local stream, also when resumed; a second worker is refused. In fast
mode two workers share each epoch: every example once, and main.py says and
records the mode."""

import collections
import shutil
import subprocess
import sys

import tensorflow as tf

from conadv.run.cluster import DISPATCHER_EXIT_CODE
from tests.child_process import run_for_result
from tests.data_service_program import BATCH, MANY, PEER_TIMEOUT, RESUME_AT
from tests.test_input_imagenet import write_imagenet_layout

#: A private network namespace with loopback up and nothing else: the tf.data
#: service servers listen on every interface, and here loopback is the only one.
LOOPBACK_ONLY = (
    *("unshare", "--user", "--map-root-user", "--net", "--"),
    *("sh", "-c", 'ip link set lo up && exec "$@"', "sh"),
)
EPOCH = 20  # records of write_imagenet_layout's training files


def loopback_only_available():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True)
    return probe.returncode == 0


def flat(batches):
    return [value for batch in batches for value in batch]


class DataServiceTest(tf.test.TestCase):
    def test_one_worker_reads_the_local_stream_and_a_second_is_refused(self):
        if not loopback_only_available():
            self.skipTest("needs unshare and ip for a loopback-only network namespace")
        data_dir = self.get_temp_dir()
        written = write_imagenet_layout(data_dir, classes=EPOCH)  # a label is a record's id
        result = run_for_result(
            "-m", "tests.data_service_program", data_dir, str(EPOCH), prefix=LOOPBACK_ONLY
        )
        local, remote, resumed = result["local"], result["remote"], result["resumed"]
        epoch_batches = EPOCH // BATCH
        self.assertStartsWith(result["dispatcher"], "grpc://localhost:")
        self.assertGreaterEqual(result["worker_tasks"], 1)
        for read in (local, remote, resumed):
            self.assertIsNone(read["error"])

        # One epoch through the service: every written record once...
        self.assertLen(remote["labels"], epoch_batches)
        written_labels = [label for _, labels in written["train"] for label in labels]
        self.assertLen(written_labels, EPOCH)
        self.assertEqual(
            collections.Counter(flat(remote["labels"])), collections.Counter(written_labels)
        )
        # ...as the same batches as locally, image by image (--deterministic).
        self.assertEqual(remote["labels"], local["labels"][:epoch_batches])
        self.assertAllClose(remote["checksums"], local["checksums"][:epoch_batches], rtol=1e-6)
        # Resumed at step RESUME_AT, across the epoch boundary: the local stream from that batch.
        after = slice(RESUME_AT, RESUME_AT + epoch_batches)
        self.assertEqual(resumed["labels"], local["labels"][after])
        self.assertAllClose(resumed["checksums"], local["checksums"][after], rtol=1e-6)

        # The count is the number of workers started (the dispatcher agrees).
        self.assertEqual(result["registered"], 2)
        self.assertEqual(result["counts"], [1, 2])
        # A pipeline built with two workers registered: one line naming the count and the fix.
        refused = result["refused"]
        self.assertIsNotNone(refused, "a pipeline was built on a service with two workers")
        self.assertRegex(
            refused, r"^--tf_data_service=grpc://localhost:\d+ has 2 workers; run exactly one"
        )
        self.assertNotIn("\n", refused)
        # Built before the second worker joined: the read stops at the first batch
        # the second worker sends, having delivered no batch twice.
        late = result["two_workers"]
        self.assertIsNotNone(
            late["error"], f"{len(late['labels'])} batches read through two workers"
        )
        self.assertLess(len(late["labels"]), MANY)
        self.assertRegex(
            late["error"],
            r"^--tf_data_service=grpc://localhost:\d+: batch 0 of the stream arrived where batch "
            r"\d+ was due.*exactly one",
        )
        self.assertNotIn("\n", late["error"])
        delivered = [tuple(round(value, 2) for value in batch) for batch in late["checksums"]]
        self.assertLen(set(delivered), len(delivered))
        shared = min(len(late["labels"]), len(local["labels"]))
        self.assertEqual(late["labels"][:shared], local["labels"][:shared])

        # Fast mode. Catches: each worker making the whole stream (ids twice), whole
        # epochs dealt to workers side by side (epoch 1's ids inside the first epoch),
        # batches made on the workers (a worker's partial last batch dropped: ids missing).
        fast = result["fast"]
        self.assertIsNone(fast["error"])
        self.assertLen(fast["labels"], 2 * epoch_batches)
        self.assertLen(set(written_labels), EPOCH)
        # An example of epoch e is the local stream's example of epoch e (per-record seeds
        # fold the epoch in): each epoch's images, every id once, and no epoch twice.
        fast_ids, fast_sums = flat(fast["labels"]), flat(fast["checksums"])
        local_ids, local_sums = flat(local["labels"]), flat(local["checksums"])
        for epoch in (0, 1):
            part = slice(epoch * EPOCH, (epoch + 1) * EPOCH)
            self.assertEqual(sorted(fast_ids[part]), sorted(written_labels), epoch)
            expected = dict(zip(local_ids[part], local_sums[part]))
            got = [expected[i] for i in fast_ids[part]]
            self.assertAllClose(fast_sums[part], got, rtol=1e-5, msg=f"epoch {epoch}")
        # Both workers made part of it (each ran a task of every epoch's job it joined).
        self.assertGreaterEqual(min(result["fast_tasks"]), 1, result["fast_tasks"])
        # Resumed at step RESUME_AT: the rest of epoch 0 re-drawn (no id twice), then epoch 1
        # whole. Catches a resume that reads a whole epoch again, or skips nothing.
        resumed = flat(result["fast_resumed"]["labels"])
        resumed_sums = flat(result["fast_resumed"]["checksums"])
        rest = EPOCH - RESUME_AT * BATCH
        self.assertLen(set(resumed[:rest]), rest)
        self.assertEqual(sorted(resumed[rest : rest + EPOCH]), sorted(written_labels))
        for epoch, part in ((0, slice(0, rest)), (1, slice(rest, rest + EPOCH))):
            whole = slice(epoch * EPOCH, (epoch + 1) * EPOCH)
            expected = dict(zip(local_ids[whole], local_sums[whole]))
            got = [expected[i] for i in resumed[part]]
            self.assertAllClose(resumed_sums[part], got, rtol=1e-5, msg=f"resumed {epoch}")
        # main.py through two workers: the trade-off said once and recorded.
        # Catches a fast mode run that says nothing, or a record without the mode.
        run = result["fast_run"]
        self.assertEqual(run["code"], 0, run["console"][-3000:])
        notes = [line for line in run["console"].splitlines() if "fast mode" in line]
        self.assertLen(notes, 1, run["console"][-3000:])
        self.assertRegex(
            notes[0],
            r"^note: --tf_data_service=grpc://localhost:\d+ with 2 workers, fast mode: every "
            r"training example once per epoch.*re-drawn, not at the exact batch",
        )
        self.assertLen(run["input_modes"], 1)
        self.assertEqual(run["input_modes"][0]["mode"], "fast")
        self.assertEqual(run["input_modes"][0]["workers"], 2)
        self.assertEqual(run["input_modes"][0]["registered"], 2)  # the dispatcher's count
        self.assertEqual(run["input_modes"][0]["from_step"], 0)
        # The dispatcher hangs (SIGSTOP) while main.py trains, both started by python -m
        # input_pipeline.service. Catches: waiting forever (TensorFlow's behaviour), a
        # watch that only connects to the port (a hung process's port still accepts), a
        # traceback, the generic exit status; the servers' program not serving.
        gone = result["dispatcher_gone"]
        print(f"dispatcher hung: main.py exited {gone['seconds']:.1f} s later", file=sys.stderr)
        self.assertEqual(gone["code"], DISPATCHER_EXIT_CODE, gone["console"][-3000:])
        self.assertLess(gone["seconds"], PEER_TIMEOUT + 30)
        errors = [line for line in gone["console"].splitlines() if line.startswith("error:")]
        self.assertLen(errors, 1, gone["console"][-3000:])
        self.assertRegex(
            errors[0],
            rf"^error: the tf.data service dispatcher grpc://localhost:\d+ has not answered "
            rf"for {PEER_TIMEOUT} s at step \d+; .*Restart the dispatcher and its workers, then "
            "every worker with the same command",
        )
        self.assertNotIn("Traceback", gone["console"])
        # --tf_data_service_workers=0 and one worker: the exact mode, recorded so.
        # Catches: 0 taken for fast mode, or the mode not recorded.
        self.assertEqual(
            [(m["mode"], m["workers"]) for m in gone["input_modes"]], [("exact", 1)], gone
        )
        self.assertIn("tf.data service dispatcher at grpc://", gone["servers"][0])
        self.assertIn("tf.data service worker localhost:", gone["servers"][1])


if __name__ == "__main__":
    tf.test.main()
