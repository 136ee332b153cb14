"""Runs a Python program in a child process and returns the JSON it prints.

Multi-device tests need logical CPU devices configured before TensorFlow
starts, so they run in a fresh interpreter that ends with ``RESULT {json}``.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_for_result(*python_args: str, timeout: int = 600, prefix: tuple = ()) -> dict:
    """``python *python_args`` in the project root; the parsed last ``RESULT`` line.

    ``prefix`` runs the interpreter under another command (for example a
    private network namespace).
    """
    proc = subprocess.run(
        [*prefix, sys.executable, *python_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child program failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
