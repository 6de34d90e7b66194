"""A rank trains with the threads it was given, on the thread that trains: Ray calls an actor's methods on its own
threads with OMP_NUM_THREADS=1, and OpenMP keeps a thread count per calling thread."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import REPO

# A TrainWorker as Ray drives it, without Ray: start() called from one thread (Ray's method pool), training on the
# thread it starts; OMP_NUM_THREADS=1 as Ray sets it for a one-CPU actor.
RANK = """
import sys, threading, time
from distgpt.config import load_job
from distgpt.orchestrator.worker import TrainWorker
from distgpt.planner.plan import Plan
job = load_job(sys.argv[1], [f"--data.prepared={sys.argv[2]}", f"--run.out_dir={sys.argv[3]}", "--train.max_steps=1",
                             "--train.progress=false", "--checkpoint.interval=0", "--train.eval_interval=0"])
w = TrainWorker(0, 1)
t = threading.Thread(target=w.start, args=(job, Plan(), ("127.0.0.1", int(sys.argv[4])), 2)); t.start(); t.join()
deadline = time.time() + 120
while w.state not in ("done", "error") and time.time() < deadline:
    time.sleep(0.1)
print("STATE", w.state, w.error)
print("\\n".join(w.logs))
"""


def test_a_rank_trains_with_its_threads_on_the_training_thread(tiny_data, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", RANK, str(REPO / "jobs" / "tiny.toml"), tiny_data, str(tmp_path),
                           str(port)], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATE done" in proc.stdout, proc.stdout[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("model:"))
    assert "device: cpu (2 threads)" in line, line  # what the training thread's kernels get, not torch's setting


def test_threads_here_reads_the_calling_threads_count():
    code = ("import threading, torch\nfrom distgpt.train.threads import adopt_process_threads, threads_here\n"
            "torch.set_num_threads(2)\nout = []\n"
            "def run(fix):\n    fix and adopt_process_threads()\n    out.append(threads_here())\n"
            "for fix in (False, True):\n    t = threading.Thread(target=run, args=(fix,)); t.start(); t.join()\n"
            "print(out, torch.get_num_threads())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**_env(), "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip() == "[1, 2] 2", proc.stdout + proc.stderr[-2000:]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
