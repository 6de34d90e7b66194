"""JobWatch: a Ray job's driver notices that the entrypoint Ray started it under has ended (the job was stopped)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from distgpt.orchestrator.supervised import RAY_JOB_ENV, JobWatch, alive

# A child in a session of its own (as Ray's job supervisor starts an entrypoint) whose shell forks python (the
# trailing `; true` keeps the shell from exec'ing it); python prints what its watch sees, once its session leader
# is gone and the watch says so, or after 20 s.
PROBE = """
import sys, time
from distgpt.orchestrator.supervised import JobWatch
w = JobWatch.here()
print("leader", w.leader, "gone", w.gone(), flush=True)
t0 = time.monotonic()
while not w.gone() and time.monotonic() - t0 < 20:
    time.sleep(0.05)
print("after", "gone" if w.gone() else "still there", flush=True)
"""


def test_outside_a_ray_job_there_is_nothing_to_watch(monkeypatch):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert JobWatch.here() is None


def test_a_driver_sees_its_entrypoint_shell_end(tmp_path):
    out = tmp_path / "out.txt"
    cmd = f"{sys.executable} -c '{PROBE}' > {out}; true"
    shell = subprocess.Popen(cmd, shell=True, start_new_session=True, env={**os.environ, RAY_JOB_ENV: "{}"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "leader" not in (out.read_text() if out.exists() else ""):
        time.sleep(0.05)
    first = out.read_text().split()
    assert first[:4] == ["leader", str(shell.pid), "gone", "False"]  # the shell leads the session
    shell.kill()  # what ray job stop does when the driver was forked after it listed the processes to signal
    shell.wait()
    while time.monotonic() < deadline and "after" not in out.read_text():
        time.sleep(0.05)
    assert out.read_text().split()[-2:] == ["after", "gone"]


def test_an_ended_process_is_not_alive_even_before_it_is_reaped():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while alive(p.pid) and time.monotonic() < deadline:  # a zombie until wait(): ended, so not alive
        time.sleep(0.05)
    assert not alive(p.pid)
    p.wait()
    assert not alive(p.pid) and alive(os.getpid())
    assert JobWatch(1).gone()  # orphaned before the watch was taken: reparented to init
