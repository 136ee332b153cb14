"""Runs Python programs in child processes: ``main.py`` as a user runs it, and
programs that print ``RESULT {json}``.

Multi-device tests need logical CPU devices configured before TensorFlow
starts, so they run in a fresh interpreter.
"""

import json
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clipped(text: str, head: int = 2000, tail: int = 4000) -> str:
    """A long stderr's first traceback lines (where the error began) and its end."""
    start = max(text.find("Traceback (most recent call last)"), 0)
    if len(text) - start <= head + tail:
        return text[start:]
    skipped = len(text) - start - head - tail
    return f"{text[start : start + head]}\n[... {skipped} characters ...]\n{text[-tail:]}"


def run_for_result(*python_args: str, timeout: int = 600, prefix: tuple = ()) -> dict:
    """``python *python_args`` in the project root; the parsed last ``RESULT`` line.

    ``prefix`` runs the interpreter under another command (for example a
    private network namespace). The program runs in a session of its own: on a
    timeout or a failure, it and every process it started are killed.
    """
    proc = subprocess.Popen(
        [*prefix, sys.executable, *python_args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", f"timed out after {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's children, orphaned or not
        except ProcessLookupError:
            pass
        proc.wait()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child program failed:\n{_clipped(stderr)}")
    return json.loads(lines[-1][len("RESULT ") :])


#: A ResNet small enough for end-to-end runs of main.py in tests.
TINY_RESNET = ("--model=resnet8", "--width_multiplier=0.25")


def run_main(*args: str, expect_ok: bool = True, env: dict | None = None):
    """``python main.py *args`` in the project root; raises with its stderr if it fails.

    ``env`` adds to (or overrides) the environment, e.g. ``TMPDIR``.
    """
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed:\n{_clipped(proc.stderr)}")
    return proc


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports free at the time of asking (for servers a test starts)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
