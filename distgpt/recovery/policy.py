"""Failure → decision. The controller reports what went wrong; a policy answers RESTART, REPLAN or RAISE.

Pure logic (no Ray), so every branch is unit-tested by handing it failures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FailureKind(str, enum.Enum):
    WORKER_DIED = "worker died"
    NODE_LOST = "node lost"
    HANG = "hang"
    PREEMPTED = "preempted"
    START_FAILED = "start failed"
    TRAINING_ERROR = "training error"
    """An exception in the training code itself (bad data, a bug): restarting would only repeat it."""


class Decision(str, enum.Enum):
    RESTART = "restart"
    """Same Plan, same kind of resources: start a fresh worker group and resume from the last checkpoint."""
    REPLAN = "replan"
    """Resources changed: ask the planner for a Plan on what is left, resume resharded into it."""
    RAISE = "raise"
    """Give up: the run fails with this failure as its cause."""


@dataclass(frozen=True)
class Failure:
    """What went wrong, on which ranks and nodes, at which step."""

    kind: FailureKind
    detail: str
    step: int = 0
    ranks: tuple[int, ...] = ()
    lost_nodes: tuple[str, ...] = ()


@dataclass
class FailurePolicy:
    """Default policy: retry up to ``max_failures`` times; re-plan when nodes went away, restart otherwise."""

    max_failures: int = 3
    seen: list[Failure] = field(default_factory=list)

    def decide(self, failure: Failure) -> Decision:
        """Record ``failure`` and return what the controller should do."""
        self.seen.append(failure)
        if failure.kind == FailureKind.TRAINING_ERROR or len(self.seen) > self.max_failures:
            return Decision.RAISE
        if failure.lost_nodes or failure.kind in (FailureKind.NODE_LOST, FailureKind.PREEMPTED):
            return Decision.REPLAN
        return Decision.RESTART
