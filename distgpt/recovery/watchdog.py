"""Hang detection: training must make progress (a higher step on some rank) within a timeout.

A stuck collective shows up as every rank sitting at the same step while their actors still answer; the watchdog
turns that into a HANG failure. Start-up (process groups, the first step's one-off costs) gets its own allowance.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Watchdog:
    """Fires when no rank's step has advanced for ``timeout_s`` (``startup_s`` until the first step completes)."""

    def __init__(self, timeout_s: float, startup_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.startup_s = startup_s
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Start watching afresh (a new worker group): the start-up allowance applies again."""
        self.best: int | None = None
        self.started = False
        self.last_progress = self.clock()

    def observe(self, step: int | None) -> None:
        """Record the highest step any rank has reached (None: no rank has built its trainer yet). The first value
        seen is the starting step (0, or where a checkpoint resumed); progress is any step beyond it."""
        if step is None:
            return
        if self.best is None:
            self.best = step
        elif step > self.best:
            self.started = True
            self.best = step
            self.last_progress = self.clock()

    def expired(self) -> float | None:
        """Seconds without progress if past the allowance, else None."""
        waited = self.clock() - self.last_progress
        return waited if waited > (self.timeout_s if self.started else self.startup_s) else None
