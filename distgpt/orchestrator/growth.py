"""Elastic growth, Ray-free: when nodes join, re-plan onto the larger cluster at the next checkpoint.

The controller asks a probe (the actor's: Ray's node list + the planner) at most every ``every_s`` whether a better
Plan exists; this class holds the decision across steps — the checkpoint it waits for, the tokens/s before, and the
measurement after — so the controller's state machine only calls ``watch`` / ``record`` and acts on what they return.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from distgpt.orchestrator.status import GrowthEvent
from distgpt.planner.plan import Plan

MEASURE_RECORDS = 3
"""Step records on the new plan averaged for 'tokens/s after' (the first one, with its warm-up, is left out)."""


@dataclass(frozen=True)
class Growth:
    """The probe's answer: a Plan worth restarting on (``plan``), or None with the reason it is kept."""

    plan: Plan | None
    detail: str


@dataclass
class GrowthWatch:
    """Pending growth re-plan and its before/after throughput."""

    probe: Callable[[], Growth | None] = lambda: None
    every_s: float = 10.0
    last_check: float = float("-inf")
    pending: tuple[int, Growth] | None = None
    """(checkpoint step it waits for, the growth)."""
    tps: list[float] = field(default_factory=list)
    """tokens/s of the step records since the last (re)start."""
    measuring: GrowthEvent | None = None
    """The 'replanned' event whose after-figure is still being measured."""
    first_step_at: float | None = None
    replanned_at: float = 0.0

    def replanned(self, event: GrowthEvent, now: float) -> None:
        """The run restarts on the grown plan: measure what follows."""
        self.measuring, self.replanned_at, self.first_step_at, self.tps = event, now, None, []

    def record(self, rec: dict, now: float) -> GrowthEvent | None:
        """Note a step record; after a growth re-plan, return the 'measured' event once there are enough."""
        if rec.get("kind") is not None or "tokens_per_s" not in rec:
            return None
        self.tps.append(float(rec["tokens_per_s"]))
        if self.measuring is None:
            return None
        if self.first_step_at is None:
            self.first_step_at = now
        if len(self.tps) > MEASURE_RECORDS:
            return self.measured()
        return None

    def measured(self) -> GrowthEvent | None:
        """The 'measured' event from what was recorded so far (also called when the run ends first)."""
        m, self.measuring = self.measuring, None
        if m is None or not self.tps:
            return None
        after = statistics.fmean(self.tps[1:] or self.tps)
        took = (self.first_step_at or self.replanned_at) - self.replanned_at
        return GrowthEvent("measured", m.step, m.plan_before, m.plan_after, m.detail, m.tokens_per_s_before,
                           after, took)

    def check(self, now: float) -> Growth | None:
        """Ask the probe, at most every ``every_s`` and never while a growth is pending."""
        if self.pending is not None or now - self.last_check < self.every_s:
            return None
        self.last_check = now
        return self.probe()

    def before(self) -> float:
        """Mean tokens/s of the last few records before the re-plan (0 when none)."""
        return statistics.fmean(self.tps[-MEASURE_RECORDS:]) if self.tps else 0.0
