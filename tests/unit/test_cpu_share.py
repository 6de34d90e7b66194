"""bench/cpu_share.py: the CPU share of a process read from /proc, and the process tree it searches."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distgpt.bench.cpu_share import _grew, _switches, descendants, measure

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc")


def test_a_process_spinning_on_one_core_gets_about_one_core():
    """One busy thread on an otherwise idle machine: its share is about one core's worth of the machine."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 6: pass"])
    try:
        got = measure(spin, ray=False, skip_s=0.5, window_s=2.0)
    finally:
        spin.wait()
    cores = os.cpu_count() or 1
    assert got is not None and 0.6 / cores < got.trainer <= 1.05 / cores, got
    assert 0.0 <= got.others < 1.0 and got.seconds == pytest.approx(2.0, abs=0.5)


def test_a_command_that_ends_first_has_no_share_and_descendants_are_found():
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert measure(quick, ray=False, skip_s=2.0, window_s=1.0) is None
    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    t0 = time.monotonic()
    assert measure(short, ray=False, skip_s=30.0, window_s=30.0) is None
    assert time.monotonic() - t0 < 15  # it returned when the command ended, not after the 60 s it asked for
    tree = subprocess.Popen(["bash", "-c", "sleep 3 & sleep 3 & wait"])
    try:
        time.sleep(0.5)
        kids = descendants(tree.pid)
        assert len(kids) == 2
        assert all(open(f"/proc/{k}/cmdline").read().startswith("sleep") for k in kids)
    finally:
        tree.kill()
        tree.wait()
    # a child started by a thread other than the main one (how a rank actor starts its training process)
    code = ("import subprocess, threading, time\n"
            "threading.Thread(target=lambda: time.sleep(30) or 0, daemon=True).start()\n"
            "t = threading.Thread(target=lambda: time.sleep(0.1) or subprocess.Popen(['sleep', '5']).wait())\n"
            "t.start(); t.join()")
    threaded = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)
        assert any(open(f"/proc/{k}/cmdline").read().startswith("sleep") for k in descendants(threaded.pid))
    finally:
        threaded.kill()
        threaded.wait()


def test_wakeups_and_preemptions_are_counted_per_thread():
    """A process that sleeps 10 ms in a loop goes to sleep (a voluntary switch) ~100 times a second; a window's
    count of its switches says so. ``measure`` reports both rates for a real window, never negative."""
    waker = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        time.sleep(0.5)
        before = _switches([waker.pid], "voluntary")
        time.sleep(2.0)
        woke = _grew(before, _switches([waker.pid], "voluntary")) / 2.0
        got = measure(waker, ray=False, skip_s=0.2, window_s=1.0)
    finally:
        waker.kill()
        waker.wait()
    assert 60 < woke < 110, woke  # at most 100/s; a loaded machine stretches the sleeps
    assert got is not None and got.preempted_per_s >= 0 and got.wakeups_per_s >= 0
