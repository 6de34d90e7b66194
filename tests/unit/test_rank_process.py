"""A rank's trainer runs in a child process of its worker actor (``orchestrator/rank_process.py``): it reports its
steps, records and result through the actor's ``poll``, dies with the actor, and takes the actor with it when it is
killed. The actor is a ``TrainWorker`` driven as Ray drives it, without Ray (its process is this test's child)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from ..conftest import REPO

ACTOR = """
import os, signal, sys, threading, time
from distgpt.config import load_job
from distgpt.orchestrator.worker import TrainWorker
from distgpt.planner.plan import Plan
mode, steps = sys.argv[5], int(sys.argv[6])
job = load_job(sys.argv[1], [f"--data.prepared={sys.argv[2]}", f"--run.out_dir={sys.argv[3]}",
                             f"--train.max_steps={steps}", "--train.progress=false", "--checkpoint.interval=0",
                             "--train.eval_interval=0", "--train.log_interval=1"])
w = TrainWorker(0, 1)
t = threading.Thread(target=w.start, args=(job, Plan(), ("127.0.0.1", int(sys.argv[4])), 1)); t.start(); t.join()
if mode == "hang":
    from distgpt.recovery.faults import Fault
    w.arm([Fault("hang", 1, 0)])  # the rank stops sending anything: only the parent-death signal can end it
print("ACTOR", os.getpid(), "RANK", w.trainer_pid(), flush=True)
seen, records, deadline = [], 0, time.time() + 120
while w.state not in ("done", "error") and time.time() < deadline:
    st = w.poll()
    records += len(st.records)
    if st.step is not None and (not seen or seen[-1] != st.step):
        seen.append(st.step)
    if mode == "kill-rank" and st.step is not None and st.step >= 2:
        os.kill(w.trainer_pid(), signal.SIGKILL)
        time.sleep(30)
        print("ACTOR SURVIVED", flush=True)
    time.sleep(0.05)
st = w.poll()
seen.append(st.step)
print("STATE", w.state, "STEPS", seen, "RECORDS", records + len(st.records), "RESULT", st.result and st.result.steps)
print("ERROR", w.error)
"""


def _start(tiny_data: str, tmp_path, mode: str, steps: int) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.Popen([sys.executable, "-c", ACTOR, str(REPO / "jobs" / "tiny.toml"), tiny_data, str(tmp_path),
                             str(port), mode, str(steps)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _pids(proc: subprocess.Popen) -> tuple[int, int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ACTOR"), line + (proc.stderr.read() if proc.stderr else "")
    parts = line.split()
    return int(parts[1]), int(parts[3])


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: dead, its parent has not reaped it
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_the_rank_process_reports_every_step_its_records_and_its_result(tiny_data, tmp_path):
    proc = _start(tiny_data, tmp_path, "run", 6)
    actor, rank = _pids(proc)
    out, err = proc.communicate(timeout=180)
    assert rank != actor  # it trains in a process of its own
    assert "STATE done" in out, out + err[-3000:]
    steps = eval(out.split("STEPS ")[1].split(" RECORDS")[0])  # noqa: S307 (our own printed list)
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6, out  # in order, from the start to the last
    assert int(out.split("RECORDS ")[1].split()[0]) >= 6, out  # one record a step (log_interval 1)
    assert "RESULT 6" in out, out


def test_the_rank_process_dies_with_its_actor_even_when_hung(tiny_data, tmp_path):
    proc = _start(tiny_data, tmp_path, "hang", 100000)
    actor, rank = _pids(proc)
    time.sleep(4)  # past step 1: hung in the drill
    os.kill(actor, signal.SIGKILL)  # how Ray stops a rank's actor (ray.kill)
    proc.wait(timeout=30)
    assert _gone(rank, 10), "the rank's process outlived its actor"


def test_a_rank_process_killed_by_a_signal_takes_its_actor_with_it(tiny_data, tmp_path):
    """A crash of the trainer (a kill drill, a segfault, the OOM killer) must read as a dead rank to the
    controller, as it did when the trainer ran inside the actor — so the actor dies too."""
    proc = _start(tiny_data, tmp_path, "kill-rank", 100000)
    _pids(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out + err[-2000:]
    assert "ACTOR SURVIVED" not in out


def test_a_rank_process_that_cannot_start_is_a_reported_error_not_a_hang(monkeypatch):
    """``start`` returns whatever happens (the controller polls for the outcome); the error says what failed."""
    from distgpt.orchestrator.rank_process import RankProcess

    got: list[tuple[str, object]] = []
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    RankProcess(lambda kind, payload: got.append((kind, payload))).start(None, None, 1)
    assert got and got[0][0] == "error" and "could not start the rank's process" in str(got[0][1]), got


def test_a_training_error_is_reported_and_drill_requests_after_the_end_are_dropped():
    """The child reports the trainer's exception and exits; a drill request that comes after (a preemption notice
    to a rank that just failed) is dropped, not an error in the controller's RPC. (The narrower race — a request
    between the child's exit and the relay seeing it, a broken pipe — is handled in ``send`` but not forced here.)"""
    from distgpt.orchestrator.rank_process import RankProcess

    got: list[tuple[str, object]] = []
    rp = RankProcess(lambda kind, payload: got.append((kind, payload)))
    rp.start(None, None, 1)  # no job: the Trainer raises at once
    assert rp.proc is not None
    rp.proc.wait(timeout=120)
    deadline = time.monotonic() + 10
    while not any(k == "error" for k, _ in got) and time.monotonic() < deadline:
        time.sleep(0.05)
    errors = [str(p) for k, p in got if k == "error"]
    assert errors and "AttributeError" in errors[0], got
    rp.send("arm", [])
    rp.send("checkpoint_at", 3)
