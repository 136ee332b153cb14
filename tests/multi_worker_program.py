"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 against one MirroredStrategy process.

Run by tests/test_multi_worker.py inside a private network namespace whose
only interface is loopback (TensorFlow's servers listen on every interface),
as ``python -m tests.multi_worker_program WORK_DIR``. It runs ``main.py``:

1. once with MirroredStrategy over 2 logical CPU devices (the reference);
2. as two workers (``TF_CONFIG``, free ports) to the end;
3. as two workers with ``--peer_timeout=HUNG_TIMEOUT``, worker 1 stopped
   (SIGSTOP: it hangs, its connections stay open) a step past a checkpoint:
   worker 0 stops by itself once the coordination service misses worker 1's
   heartbeats; then worker 1 is SIGKILLed and both are restarted;
4. at once: worker 0 of a two-worker cluster whose worker 1 never starts,
   worker 1 of one whose worker 0 (the coordination service's leader) never
   starts, and two workers whose worker 0 is SIGKILLed while training.

and prints ``RESULT {json}`` with the largest differences between the final
checkpoints' model variables, the files each run left, where the restarted
run resumed, and how (exit status, seconds, console lines) the survivors of
3 and 4 and the lone workers of 4 stopped. Every worker it starts is killed
before it exits, also when something fails.
"""

import json
import os
import signal
import subprocess
import sys
import time

from tests.child_process import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT_EVERY = 10, 3
#: --peer_timeout and --cluster_start_timeout of these runs (seconds).
PEER_TIMEOUT, START_TIMEOUT = 10, 10
#: --peer_timeout of the cluster whose worker 1 hangs: far below TensorFlow's own 10 s
#: heartbeat timeout, so a survivor left to TensorFlow's default is caught.
HUNG_TIMEOUT = 2
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
)
TIMEOUT = 600

_children: list[subprocess.Popen] = []


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


def start_workers(
    model_dir, work_dir, tag, indices=(0, 1), peer_timeout=PEER_TIMEOUT, start_timeout=300
):
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
                    f"--peer_timeout={peer_timeout}",
                    f"--cluster_start_timeout={start_timeout}",
                ],
                os.path.join(work_dir, f"{tag}_worker{index}.log"),
                env={"TF_CONFIG": json.dumps(tf_config)},
            )
        )
        procs[-1].cluster = cluster["worker"]
    return procs


def stopped(proc, since, console_log, timeout):
    """How ``proc`` ended: exit status (None: killed after ``timeout`` s), seconds after
    ``since``, its console's lines, the cluster's addresses."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    seconds = time.time() - since
    with open(console_log) as f:
        console = f.read().splitlines()
    return {"code": code, "seconds": seconds, "console": console, "cluster": proc.cluster}


def wait_for(condition, procs, what):
    deadline = time.time() + TIMEOUT
    while not condition():
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the workers stopped (or hung) before {what}")
        time.sleep(0.02)


def printed(console_log, text):
    with open(console_log) as f:
        return text in f.read()


def logged(model_dir, text, seconds=5.0):
    """Whether ``model_dir``'s log.txt has ``text`` (TensorFlow's C++ lines reach it
    through a tee process that may still be writing: waited for a moment)."""
    deadline = time.time() + seconds
    while True:
        try:
            with open(os.path.join(model_dir, "log.txt")) as f:
                if text in f.read():
                    return True
        except FileNotFoundError:
            pass
        if time.time() > deadline:
            return False
        time.sleep(0.1)


def hung_worker(work_dir, killed, result):
    """Scenario 3: worker 1 hangs a step past checkpoint CHECKPOINT_EVERY."""
    procs = start_workers(killed, work_dir, "killed", peer_timeout=HUNG_TIMEOUT)
    first = CHECKPOINT_EVERY
    # A checkpoint counts once the manager's state file lists it (it is written after
    # the checkpoint's files): the chief's and worker 1's. Then a step past it, so the
    # step that is lost is not a checkpoint's.
    wait_for(
        lambda: (
            listed(os.path.join(killed, "checkpoint"), f"ckpt-{first}")
            and listed(os.path.join(killed, "worker_1", "checkpoint"), f"ring-{first}")
        ),
        procs,
        "their first checkpoint",
    )
    console = os.path.join(work_dir, "killed_worker0.log")
    wait_for(lambda: printed(console, f"step {first + 1}/"), procs, f"step {first + 1}")
    # Stopped, worker 1 takes part in no collective: worker 0 can finish at most the step
    # it is in, far from the next checkpoint (and the end) whatever the machine's load.
    procs[1].send_signal(signal.SIGSTOP)
    hung_at = time.time()
    survivor = stopped(procs[0], hung_at, console, 10 * HUNG_TIMEOUT + 60)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    survivor["log_has_traceback"] = logged(killed, "Traceback (most recent call last)")
    survivor["log_has_tensorflow_error"] = logged(killed, "/job:worker/replica:0/task:1")
    result["survivor"] = survivor
    result["at_kill"] = {
        "chief": sorted(f for f in os.listdir(killed) if f.endswith(".index")),
        "worker_1": sorted(
            f for f in os.listdir(os.path.join(killed, "worker_1")) if f.endswith(".index")
        ),
    }
    wait_all(
        start_workers(killed, work_dir, "restarted", peer_timeout=HUNG_TIMEOUT),
        "restarted workers",
    )
    with open(os.path.join(killed, "log.txt")) as f:
        result["restored"] = [line.strip() for line in f if "Restored" in line]
        f.seek(0)
        result["refilled"] = [line.strip() for line in f if "refilled" in line]


def incomplete_clusters(work_dir, result):
    """Scenario 4, its three clusters at once."""
    started = time.time()
    alone, no_leader = (
        start_workers(
            os.path.join(work_dir, name), work_dir, name, (index,), start_timeout=START_TIMEOUT
        )
        for name, index in (("alone", 0), ("no_leader", 1))
    )
    leader_dir = os.path.join(work_dir, "leader_lost")
    pair = start_workers(leader_dir, work_dir, "leader_lost")
    wait_for(
        lambda: printed(os.path.join(work_dir, "leader_lost_worker0.log"), "step 1/"),
        pair,
        "step 1",
    )
    pair[0].send_signal(signal.SIGKILL)
    killed_at = time.time()
    pair[0].wait()
    result["leader_lost"] = stopped(
        pair[1], killed_at, os.path.join(work_dir, "leader_lost_worker1.log"), 6 * PEER_TIMEOUT
    )
    for name, procs, index in (("alone", alone, 0), ("no_leader", no_leader, 1)):
        console = os.path.join(work_dir, f"{name}_worker{index}.log")
        result[name] = stopped(procs[0], started, console, 8 * START_TIMEOUT)
    result["no_leader"]["log_has_traceback"] = logged(
        os.path.join(work_dir, "no_leader", "worker_1"), "Traceback (most recent call last)"
    )


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

        hung_worker(work_dir, killed, result)
        incomplete_clusters(work_dir, result)

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
