"""``distgpt bench launcher --interleave S``: the per-step cost of training on Ray, with the VM's drift taken out.

Run after run, this 2-core VM flips between two speeds (about 43 and 53 ms for the same step, phases of 10–30 s, with
or without Ray), so two separate runs of a few minutes differ by ±10% whatever launched them. Here both launchers
train the same job at once and take turns: every ``S`` seconds one training process is stopped (SIGSTOP) and the
other continued, so each window has the machine to itself and a phase of the VM lands on both. Each window's median
step time (from the step's own timestamp, the first second after a switch left out) is paired with the next
window of the other launcher.

What it does not measure: start-up (the ABBA mode does), and Ray's background processes run during the in-process
trainer's windows too — a cost both sides pay here, so the ratio is the rank's own overhead (its actor process,
Ray's threads in it, the controller's polls), not Ray's daemons'.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from distgpt.bench.cpu_share import descendants, rank_processes
from distgpt.bench.launcher_bench import DEFAULT
from distgpt.train.metrics import read_records

SETTLE_S = 1.0
"""Left out at the start of each window: the resumed process's caches and OpenMP threads warm up again."""


def window_medians(stamps: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float | None]:
    """The median step time of the steps that ended inside each (start, end) window (None with fewer than 5)."""
    out: list[float | None] = []
    for a, b in windows:
        inside = [s for t, s in stamps if a <= t <= b]
        out.append(statistics.median(inside) if len(inside) >= 5 else None)
    return out


def _stamps(out: str) -> list[tuple[float, float]]:
    return [(r["time"], r["step_time_s"]) for r in read_records(out) if r.get("kind") is None and "step_time_s" in r]


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _gone(pids: list[int], wait_s: float = 10.0) -> None:
    """Wait for killed processes to go (Ray's daemons take a moment), so the next command starts on a quiet machine."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)


def _alternate(trainers: dict[str, list[int]], window_s: float, windows: int) -> dict[str, list[tuple[float, float]]]:
    """Give the machine to each trainer in turn (on Ray: the rank's actor and its training process); return each
    one's windows (start after settling, end)."""
    spans: dict[str, list[tuple[float, float]]] = {"ray": [], "local": []}
    try:
        for i in range(windows):
            on, off = ("ray", "local") if i % 2 == 0 else ("local", "ray")
            _signal(trainers[off], signal.SIGSTOP)
            _signal(trainers[on], signal.SIGCONT)
            t0 = time.time()
            time.sleep(window_s)
            spans[on].append((t0 + SETTLE_S, time.time()))
    finally:
        _signal([p for pids in trainers.values() for p in pids], signal.SIGCONT)
    return spans


def run_interleaved(job: str, overrides: list[str], window_s: float, windows: int) -> int:
    """Both launchers at once, taking turns ``windows`` times for ``window_s`` each; print the per-step ratio."""
    flags = [*DEFAULT, *overrides, "--train.log_interval=1", "--train.eval_interval=0", "--train.max_steps=1000000"]
    print(f"distgpt train {job} {' '.join(flags)}: Ray's rank and the in-process trainer taking turns, "
          f"{windows} windows of {window_s:g} s")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "distgpt.cli", "train", job, *flags]
        ray_p = subprocess.Popen([*cmd, f"--run.out_dir={tmp}/ray"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        local_p = subprocess.Popen([*cmd, f"--run.out_dir={tmp}/local", "--cluster.launcher=local"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        everything = [local_p.pid, ray_p.pid]
        try:
            rank: list[int] = []
            deadline = time.monotonic() + 180
            while not rank and ray_p.poll() is None and local_p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                rank = rank_processes(ray_p)
            if not rank:
                raise RuntimeError("no Ray rank process to time (a launcher ended before training, or the rank's "
                                   "process was not found in 3 minutes) — run each alone to see why")
            everything += descendants(ray_p.pid)  # the embedded cluster's processes go with the run
            time.sleep(15)  # both past their start-up
            spans = _alternate({"ray": rank, "local": [local_p.pid]}, window_s, windows)
        finally:
            everything += descendants(ray_p.pid)
            _signal(everything, signal.SIGKILL)
            ray_p.wait()
            local_p.wait()
            _gone(everything)
        ray_ms = window_medians(_stamps(f"{tmp}/ray"), spans["ray"])
        local_ms = window_medians(_stamps(f"{tmp}/local"), spans["local"])
    return _report(ray_ms, local_ms)


def _report(ray_ms: list[float | None], local_ms: list[float | None]) -> int:
    pairs = [lo / ra for ra, lo in zip(ray_ms, local_ms, strict=False) if ra and lo]
    if len(pairs) < 2:
        print("too few windows with steps in them — use longer or more windows")
        return 1
    geo = math.exp(statistics.fmean(math.log(x) for x in pairs))
    sd = statistics.stdev(math.log(x) for x in pairs) / math.sqrt(len(pairs))
    print("  step ms, Ray's rank:  " + " ".join(f"{1e3 * x:.1f}" if x else "-" for x in ray_ms))
    print("  step ms, in-process:  " + " ".join(f"{1e3 * x:.1f}" if x else "-" for x in local_ms))
    print(f"per step: Ray / local {geo:.3f}× ±{100 * 1.96 * sd:.1f}% (95% interval, {len(pairs)} adjacent pairs; "
          f"median {statistics.median(pairs):.3f}, range {min(pairs):.3f}–{max(pairs):.3f})")
    return 0
