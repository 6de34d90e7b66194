"""Fault injection specs: ``kind@STEP:RANK`` — e.g. ``kill@7:1`` kills rank 1's actor once step 7 is reported.

Used by recovery drills and tests; each fault fires once per run (a restarted group does not see it again).
"""

from __future__ import annotations

from dataclasses import dataclass

from distgpt.errors import DistgptError

KINDS = ("kill", "hang", "preempt", "remove", "oom", "slow")
WORKER_FAULTS = KINDS
"""All are fired by the ranks themselves at their exact step: 'kill' and 'hang' by RANK; 'preempt' by every rank
(a preemption notice for RANK's node: all save a checkpoint after STEP, then drain until the controller stops them);
'remove' — RANK's node dies without notice: the rank SIGKILLs its node's raylet (Ray marks the node dead once its
health checks fail, ~15 s by default; every rank there dies with it);
'oom' — RANK raises torch's OutOfMemoryError, as a too-large micro-batch would; 'slow' — RANK sleeps SLOW_S before
every step from STEP on (a straggler: the run goes on, slower)."""
SLOW_S = 0.5


class FaultError(DistgptError, ValueError):
    """A malformed fault spec."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` at (after) training step ``step`` on ``rank``."""

    kind: str
    step: int
    rank: int = 0


def parse_faults(specs: list[str]) -> list[Fault]:
    """Parse ``['kill@7:1', 'hang@12']``; raise FaultError naming the bad entry and the expected form."""
    out = []
    for spec in specs:
        try:
            kind, rest = spec.split("@", 1)
            step, _, rank = rest.partition(":")
            fault = Fault(kind.strip(), int(step), int(rank) if rank else 0)
        except ValueError:
            raise FaultError(f"{spec!r} — write kind@STEP:RANK, e.g. 'kill@7:1'") from None
        if fault.kind not in KINDS or fault.step < 1 or fault.rank < 0:
            raise FaultError(f"{spec!r} — kind must be one of {', '.join(KINDS)}, STEP ≥ 1, RANK ≥ 0")
        out.append(fault)
    return sorted(out, key=lambda f: f.step)
