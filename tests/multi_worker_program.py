"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 against one MirroredStrategy process.

Run by tests/test_multi_worker.py inside a private network namespace whose
only interface is loopback (TensorFlow's servers listen on every interface),
as ``python -m tests.multi_worker_program WORK_DIR``. It runs ``main.py``:

1. once with MirroredStrategy over 2 logical CPU devices (the reference);
2. as two workers (``TF_CONFIG``, free ports) to the end;
3. as two workers, worker 1 killed (SIGKILL) after a checkpoint: worker 0
   stops by itself; then both are restarted;
4. as worker 0 of a two-worker cluster whose worker 1 never starts.

and prints ``RESULT {json}`` with the largest differences between the final
checkpoints' model variables, the files each run left, where the restarted
run resumed, and how (exit status, seconds, console lines) the survivor of
3 and the lone worker of 4 stopped. Every worker it starts is killed before
it exits, also when something fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY = 10, 3
#: --peer_timeout and --cluster_start_timeout of these runs (seconds).
PEER_TIMEOUT, START_TIMEOUT = 10, 10
COMMON = (
    "--dataset=digits",
    "--image_size=16",
    "--model=resnet8",
    "--width_multiplier=0.25",
    "--method=conadv",
    "--staleness=1",
    "--batch_size=16",
    "--eval_batch_size=16",
    f"--train_steps={STEPS}",
    "--steps_per_loop=1",
    f"--checkpoint_steps={CHECKPOINT_EVERY}",
    "--mode=train",
    "--deterministic",
    "--optimizer=momentum",
    "--learning_rate=0.1",
    "--warmup_epochs=0",
    "--lr_schedule=cosine",
    "--seed=7",
    f"--peer_timeout={PEER_TIMEOUT}",
)
TIMEOUT = 600

_children: list[subprocess.Popen] = []


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(args, log_path, env=None):
    log = open(log_path, "a")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    _children.append(proc)
    return proc


def wait_all(procs, what):
    for proc in procs:
        code = proc.wait(timeout=TIMEOUT)
        if code != 0:
            raise RuntimeError(f"{what}: a process exited with {code}")


def start_workers(model_dir, work_dir, tag, indices=(0, 1), extra=()):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in indices:
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        procs.append(
            start(
                [
                    *COMMON,
                    "--distribution_strategy=multi_worker_mirrored",
                    f"--model_dir={model_dir}",
                    *extra,
                ],
                os.path.join(work_dir, f"{tag}_worker{index}.log"),
                env={"TF_CONFIG": json.dumps(tf_config)},
            )
        )
        procs[-1].cluster = cluster["worker"]
    return procs


def stopped(proc, since, console_log, timeout):
    """How ``proc`` ended: exit status (None: killed after ``timeout`` s), seconds after
    ``since``, its console's lines."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    seconds = time.time() - since
    with open(console_log) as f:
        console = f.read().splitlines()
    return {"code": code, "seconds": seconds, "console": console}


def listed(state_file, name):
    """Whether a CheckpointManager state file lists checkpoint ``name``."""
    try:
        with open(state_file) as f:
            return f'"{name}"' in f.read()
    except OSError:
        return False


def model_variables(model_dir, step):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(model_dir, f"ckpt-{step}"))
    return {
        key: reader.get_tensor(key)
        for key in reader.get_variable_to_shape_map()
        if key.startswith("model/")
    }


def max_relative_difference(a, b):
    import numpy as np

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(a[k])) + 1e-12)) for k in a)


def main():
    work_dir = sys.argv[1]
    reference = os.path.join(work_dir, "mirrored")
    whole = os.path.join(work_dir, "whole")
    killed = os.path.join(work_dir, "killed")
    result = {}
    try:
        wait_all(
            [
                start(
                    [
                        *COMMON,
                        "--distribution_strategy=mirrored",
                        "--num_cpu_devices=2",
                        f"--model_dir={reference}",
                    ],
                    os.path.join(work_dir, "mirrored.log"),
                )
            ],
            "mirrored reference",
        )
        wait_all(start_workers(whole, work_dir, "whole"), "two workers")

        procs = start_workers(killed, work_dir, "killed")
        first = CHECKPOINT_EVERY
        deadline = time.time() + TIMEOUT
        # A checkpoint counts once the manager's state file lists it (it is
        # written after the checkpoint's files): the chief's and worker 1's.
        while not (
            listed(os.path.join(killed, "checkpoint"), f"ckpt-{first}")
            and listed(os.path.join(killed, "worker_1", "checkpoint"), f"ring-{first}")
        ):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the workers stopped (or hung) before their first checkpoint")
            time.sleep(0.02)
        # ...and a step past it, so the step that is lost is not a checkpoint's.
        console = os.path.join(work_dir, "killed_worker0.log")
        while f"step {first + 1}/" not in open(console).read():
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the workers stopped (or hung) before step {first + 1}")
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[1].wait()
        result["survivor"] = stopped(
            procs[0], killed_at, os.path.join(work_dir, "killed_worker0.log"), 3 * PEER_TIMEOUT
        )
        result["survivor"]["cluster"] = procs[0].cluster
        with open(os.path.join(killed, "log.txt")) as f:
            text = f.read()  # the survivor's log: the whole error is there
        result["survivor"]["log_has_traceback"] = "Traceback (most recent call last)" in text
        result["survivor"]["log_has_tensorflow_error"] = "/job:worker/replica:0/task:1" in text
        result["at_kill"] = {
            "chief": sorted(f for f in os.listdir(killed) if f.endswith(".index")),
            "worker_1": sorted(
                f for f in os.listdir(os.path.join(killed, "worker_1")) if f.endswith(".index")
            ),
        }
        wait_all(start_workers(killed, work_dir, "restarted"), "restarted workers")
        with open(os.path.join(killed, "log.txt")) as f:
            result["restored"] = [line.strip() for line in f if "Restored" in line]
            f.seek(0)
            result["refilled"] = [line.strip() for line in f if "refilled" in line]

        started = time.time()
        alone = start_workers(
            os.path.join(work_dir, "alone"),
            work_dir,
            "alone",
            indices=(0,),
            extra=(f"--cluster_start_timeout={START_TIMEOUT}",),
        )
        result["alone"] = stopped(
            alone[0], started, os.path.join(work_dir, "alone_worker0.log"), 8 * START_TIMEOUT
        )
        result["alone"]["cluster"] = alone[0].cluster

        ref = model_variables(reference, STEPS)
        result["whole_vs_mirrored"] = max_relative_difference(ref, model_variables(whole, STEPS))
        result["killed_vs_mirrored"] = max_relative_difference(ref, model_variables(killed, STEPS))
        result["files"] = {
            "whole": sorted(os.listdir(whole)),
            "killed": sorted(os.listdir(killed)),
            "mirrored": sorted(os.listdir(reference)),
        }
        with open(os.path.join(whole, "summary.json")) as f:
            result["whole_summary_steps"] = json.load(f)["train_steps"]
    finally:
        for proc in _children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
