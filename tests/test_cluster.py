"""What a worker that lost its peers says, without a cluster: the checkpoint a restart
resumes from (read from every worker's checkpoint state file), which TensorFlow
errors are a lost peer, the input mode's record, and fast mode's file count.
(The clusters themselves: tests/test_multi_worker.py, tests/test_data_service.py.)"""

import contextlib
import io
import os

import tensorflow as tf
from absl import flags as absl_flags

import flags as conadv_flags
from conadv.run import cluster, input_mode, run_identity
from conadv.run.checkpoints import resumable_step
from conadv.run.run_files import planned_private_dir
from conadv.run_config import RunConfig
from input_pipeline.base import TRAIN, DataError, PipelineOptions
from input_pipeline.imagenet import ImageNetSource
from tests.test_input_imagenet import write_imagenet_layout


def kept(directory, name, steps):
    """A CheckpointManager's state file in ``directory`` listing ``name-<step>``."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{name}-{step}") for step in steps]
    tf.compat.v1.train.update_checkpoint_state(
        directory, paths[-1], all_model_checkpoint_paths=paths
    )


class ResumableStepTest(tf.test.TestCase):
    def test_the_step_every_worker_has_its_state_for(self):
        # Catches: the chief's newest checkpoint named while worker 1 died before saving
        # its ring for it (the restart then resumes one checkpoint earlier).
        model_dir = self.get_temp_dir()
        self.assertEqual(resumable_step(model_dir), -1)
        kept(model_dir, "ckpt", [3, 6])
        self.assertEqual(resumable_step(model_dir), 6)  # no worker with a ring
        os.makedirs(os.path.join(model_dir, "worker_2"))  # a worker with no ring yet
        kept(os.path.join(model_dir, "worker_1"), "ring", [3])
        self.assertEqual(resumable_step(model_dir), 3)
        self.assertEqual(
            cluster.resumes_from(model_dir).split(",")[0], "the run resumes from ckpt-3"
        )
        kept(os.path.join(model_dir, "worker_1"), "ring", [3, 6])
        self.assertEqual(resumable_step(model_dir), 6)


def error(kind, text):
    return kind(None, None, text)


class PeerFailureTest(tf.test.TestCase):
    def test_only_an_error_about_a_peer_is_a_lost_peer(self):
        # Catches: every Unavailable/DeadlineExceeded error (a file system's hiccup) reported
        # as a lost worker with exit 4; this worker blaming itself.
        own = ("worker", 0)
        gcs = error(tf.errors.UnavailableError, "Error executing an HTTP request: connection reset")
        self.assertFalse(cluster.is_peer_failure(gcs, own))
        self.assertFalse(cluster.is_peer_failure(ValueError("coordination service"), own))
        remote = "Connection reset by peer; remote target /job:worker/replica:0/task:{}"
        self.assertTrue(
            cluster.is_peer_failure(error(tf.errors.UnavailableError, remote.format(1)), own)
        )
        self.assertFalse(
            cluster.is_peer_failure(error(tf.errors.UnavailableError, remote.format(0)), own)
        )
        aborted = error(tf.errors.CancelledError, "Collective ops is aborted by: ...")
        self.assertTrue(cluster.is_peer_failure(aborted, own))


class PlannedLogTest(tf.test.TestCase):
    def test_a_bad_tf_config_leaves_the_error_to_the_strategy(self):
        # Catches: a traceback from parsing TF_CONFIG before the strategy's one-line error,
        # the chief's log put in worker_0/ when TF_CONFIG is empty.
        for bad in ("", "{", '{"task": {"type": "worker", "index": "x"}, "cluster": {}}', "[]"):
            self.assertIsNone(planned_private_dir("/run", bad), bad)
        config = '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": %d}}'
        self.assertEqual(planned_private_dir("/run", config % 0), "/run")
        self.assertEqual(planned_private_dir("/run", config % 1), "/run/worker_1")


class InputModeRecordTest(tf.test.TestCase):
    def test_the_recorded_mode_reads_back(self):
        # Catches: input_modes written to run_config.json but not a RunConfig field (every
        # tf.data service run's record then failed to read: TypeError).
        model_dir = os.path.join(self.get_temp_dir(), "run")
        values = absl_flags.FlagValues()
        conadv_flags.define_all(values)
        values(
            [
                "prog",
                "--dataset=imagenet",
                f"--data_dir={self.get_temp_dir()}",
                "--tf_data_service=grpc://localhost:1",
                "--tf_data_service_workers=2",
                f"--model_dir={model_dir}",
            ]
        )
        run = RunConfig.from_flags(values)
        os.makedirs(model_dir)
        path = os.path.join(model_dir, run_identity.RUN_CONFIG)
        run.write(path)
        with contextlib.redirect_stdout(io.StringIO()):
            entry = input_mode.say_and_record(run, registered=2)
        self.assertEqual((entry["mode"], entry["registered"], entry["from_step"]), ("fast", 2, 0))
        self.assertEqual(RunConfig.read(path).input_modes, [entry])


class FastModeFilesTest(tf.test.TestCase):
    def test_fewer_files_than_input_pipelines_are_refused(self):
        # Catches: sharding each file's records per input pipeline under dynamic sharding,
        # which the service does per worker (examples lost or read twice in an epoch).
        data_dir = self.get_temp_dir()
        write_imagenet_layout(data_dir)  # 4 training files
        options = PipelineOptions(
            seed=1, tf_data_service="grpc://localhost:1", tf_data_service_workers=2
        )
        source = ImageNetSource(data_dir, image_size=32, one_based_labels=True, options=options)
        context = tf.distribute.InputContext(num_input_pipelines=8, input_pipeline_id=0)
        with self.assertRaisesRegex(DataError, "training split has 4 files; write at least 8"):
            source.dataset(TRAIN, 4, input_context=context)


if __name__ == "__main__":
    tf.test.main()
