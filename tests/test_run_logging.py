"""A quiet console: a run prints its own lines, not TensorFlow's INFO chatter; a file has all."""

import glob
import os
import re
import tempfile

import tensorflow as tf

from conadv.run.run_logging import LOG_FILE
from tests.child_process import ROOT, TINY_RESNET, run_main

# absl's and TensorFlow C++'s line format: I<mmdd> <time> <thread> <file>:<line>] ...
INFO_LINE = re.compile(r"^I\d{4} \S+\s+\d+ ([\w.]+):\d+\]")


def project_files() -> set[str]:
    return {
        os.path.basename(path)
        for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
        if ".venv" not in path
    }


class QuietConsoleTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = tempfile.mkdtemp()
        cls.proc = run_main(
            *TINY_RESNET,
            "--train_steps=2",
            "--steps_per_loop=1",
            "--checkpoint_steps=1",
            f"--model_dir={cls.model_dir}",
        )

    def test_console_has_no_library_info_line(self):
        ours = project_files()
        console = (self.proc.stdout + self.proc.stderr).splitlines()
        foreign = []
        for line in console:
            match = INFO_LINE.match(line)
            if (match and match.group(1) not in ours) or line.startswith("INFO:tensorflow"):
                foreign.append(line)
        self.assertEqual(foreign, [])
        # The run's own lines are there.
        self.assertTrue(any(line.startswith("step 2/2") for line in console), console[-5:])
        self.assertTrue(any(line.startswith("eval at step 2") for line in console))

    def test_log_file_has_tensorflow_info_lines(self):
        with open(os.path.join(self.model_dir, LOG_FILE)) as f:
            lines = f.read().splitlines()
        ours = project_files()
        # "<time> INFO <logger> <file>:<line>] ...": INFO records from TensorFlow's files.
        library_info = [
            line
            for line in lines
            if " INFO " in line and line.split("] ")[0].split()[-1].split(":")[0] not in ours
        ]
        self.assertNotEqual(library_info, [])
        # And the project's own INFO lines.
        self.assertTrue(any("trainer.py" in line for line in lines))


if __name__ == "__main__":
    tf.test.main()
