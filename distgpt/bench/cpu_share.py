"""Where a machine's CPU went while a command trained: the training process's share and everyone else's.

Throughput ratios on a noisy 2-core VM move by ±5% from run to run; CPU time read from ``/proc`` over the same
window does not, and says *why* a launcher is slower: the share of the cores the training process got, and how busy
the rest of the machine was (on Ray: its daemons, the controller actor and the driver). Linux only; elsewhere
``None``.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuShare:
    """CPU over one window of a run, as fractions of the whole machine (all cores)."""

    trainer: float
    """The training process (every thread of it)."""
    others: float
    """Every other process on the machine."""
    seconds: float
    preempted_per_s: float = 0.0
    """How often the training process's threads were switched out while they could still run (involuntary context
    switches): on a machine its threads fill, every time something else woke up and took a core."""
    wakeups_per_s: float = 0.0
    """How often a thread of any other process went to sleep (voluntary context switches), i.e. woke up to do
    something: Ray's daemons, actors and gRPC threads poll on timers, and each wake-up needs a core."""


def _switches(pids: list[int], kind: str) -> dict[int, int]:
    """``kind`` ('voluntary' or 'nonvoluntary') context switches of every thread of ``pids``, by thread id."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    line = next(x for x in f if x.startswith(f"{kind}_ctxt_switches:"))
                out[int(tid)] = int(line.split()[1])
            except (OSError, StopIteration, ValueError):
                continue
    return out


def _grew(before: dict[int, int], after: dict[int, int]) -> int:
    """Switches over the window (a thread born inside it counts from zero; one that ended is lost)."""
    return sum(n - before.get(tid, 0) for tid, n in after.items())


def _others(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != pid]


def _proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, … (an embedded Ray cluster's rank actors are the driver's grandchildren).
    Every thread's children: a rank's process is started by one of its actor's threads, not the main one."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
        out += kids
        todo += kids
    return out


def rank_processes(proc: subprocess.Popen) -> list[int]:
    """On Ray: the rank — its ``ray::TrainWorker`` actor and the process that trains, the actor's child
    (``orchestrator/rank_process.py``) — once both run; [] before."""
    for p in descendants(proc.pid):
        try:
            with open(f"/proc/{p}/cmdline") as f:
                if not f.read().startswith("ray::TrainWorker"):
                    continue
        except OSError:
            continue
        for c in descendants(p):
            try:
                with open(f"/proc/{c}/cmdline") as f:
                    if "distgpt.orchestrator.rank_process" in f.read():
                        return [p, c]
            except OSError:
                continue
    return []


def find_trainer(proc: subprocess.Popen, ray: bool) -> int | None:
    """The process that trains: the command itself, or (on Ray) the rank's process under its ``ray::TrainWorker``."""
    if not ray:
        return proc.pid
    rank = rank_processes(proc)
    return rank[-1] if rank else None


def _runs_for(proc: subprocess.Popen, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``proc`` ends first (then at once: a caller timing the command must not wait out a
    window the command no longer fills)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    return proc.poll() is None


def measure(proc: subprocess.Popen, ray: bool, skip_s: float = 10.0, window_s: float = 30.0) -> CpuShare | None:
    """Wait for the training process, let it run ``skip_s`` (start-up, compilation of nothing, first evals), then
    read CPU over ``window_s``. ``None`` if the command ends first or this is not Linux."""
    if not os.path.exists("/proc/stat"):
        return None
    pid = None
    while pid is None and proc.poll() is None:
        time.sleep(0.5)
        pid = find_trainer(proc, ray)
    if pid is None or not _runs_for(proc, skip_s):
        return None
    try:
        p0, v0 = _switches([pid], "nonvoluntary"), _switches(_others(pid), "voluntary")
        t0, m0, w0 = _proc_ticks(pid), _machine_busy_ticks(), time.monotonic()
        if not _runs_for(proc, window_s):
            return None
        t1, m1, w1 = _proc_ticks(pid), _machine_busy_ticks(), time.monotonic()
        p1, v1 = _switches([pid], "nonvoluntary"), _switches(_others(pid), "voluntary")
    except (OSError, TypeError):  # it ended inside the window
        return None
    if proc.poll() is not None:
        return None
    total = (w1 - w0) * TICKS * (os.cpu_count() or 1)
    trainer = (t1 - t0) / total
    return CpuShare(trainer, max(0.0, (m1 - m0) / total - trainer), w1 - w0,
                    _grew(p0, p1) / (w1 - w0), _grew(v0, v1) / (w1 - w0))
