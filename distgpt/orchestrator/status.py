"""What crosses the Ray boundaries, as typed dataclasses: worker → controller (``RankStatus``), controller → driver
(``Event`` subclasses), and the run's outcome (``RunSummary``). No Ray, no torch: the controller's unit tests and
the driver's display use these without starting anything.

Metric records stay plain dicts inside ``RecordEvent``: their fields are whatever the objective and the trainer log.
Every dataclass here also reads like a mapping (``summary["result"]["steps"]``) for scripts that index it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distgpt.recovery.policy import Failure


class Readable:
    """Mapping-style read access to a dataclass's fields (``x["name"]`` ≡ ``x.name``)."""

    def __getitem__(self, key: str) -> Any:
        if key == "kind" and hasattr(type(self), "kind"):
            return self.kind  # type: ignore[attr-defined]
        if key not in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class RunResult(Readable):
    """What a finished trainer reports (rank 0)."""

    steps: int
    tokens_per_s: float
    final_dir: str
    loop_time: float = 0.0
    step_times: tuple[float, ...] = ()


@dataclass
class RankStatus(Readable):
    """One rank's answer to a poll: its step (None before its trainer exists), new records and log lines."""

    rank: int
    step: int | None
    state: str
    """created | starting | running | done | error"""
    records: list[dict] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    error: str | None = None
    result: RunResult | None = None


@dataclass
class GroupStatus(Readable):
    """One poll of every rank."""

    steps: dict[int, int | None] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    done: bool = False
    result: RunResult | None = None
    failure: Failure | None = None

    @property
    def step(self) -> int | None:
        """The highest step any rank has reached (None before any trainer exists)."""
        known = [s for s in self.steps.values() if s is not None]
        return max(known) if known else None


@dataclass(frozen=True)
class Event(Readable):
    """Something the controller tells the driver; ``time`` is when it happened (Unix seconds)."""

    kind: ClassVar[str] = "event"
    time: float = field(default=0.0, kw_only=True)


@dataclass(frozen=True)
class RecordEvent(Event):
    """A metric record from rank 0 (for metrics.jsonl, TensorBoard and the progress bar)."""

    kind: ClassVar[str] = "record"
    record: dict


@dataclass(frozen=True)
class LogEvent(Event):
    """A log line from a rank."""

    kind: ClassVar[str] = "log"
    line: str


@dataclass(frozen=True)
class StateEvent(Event):
    """The controller entered ``state`` (planning, scheduling, running, recovering, finished, failed)."""

    kind: ClassVar[str] = "state"
    state: str
    detail: str = ""


@dataclass(frozen=True)
class PlacementEvent(Event):
    """An attempt's workers were placed: rank → node id."""

    kind: ClassVar[str] = "placement"
    attempt: int
    plan: str
    nodes: dict[int, str]
    summary: str


@dataclass(frozen=True)
class RecoveryEvent(Event):
    """A failure was handled: what it was, what the policy decided, the Plan the run continues with."""

    kind: ClassVar[str] = "recovery"
    cause: str
    detail: str
    step: int
    decision: str
    plan: str
    attempt: int


@dataclass(frozen=True)
class ResumedEvent(Event):
    """The first step after a recovery completed, ``seconds`` after the failure was detected."""

    kind: ClassVar[str] = "resumed"
    step: int
    seconds: float


@dataclass(frozen=True)
class GrowthEvent(Event):
    """Nodes joined during the run. ``stage``: 'detected' (a checkpoint is requested), 'replanned' (the run
    restarts on ``plan_after``), 'measured' (tokens/s on the new plan; ``seconds``: from the re-plan to its first
    step), or 'kept' (the planner sees no gain worth a restart, or the job fixes its plan)."""

    kind: ClassVar[str] = "growth"
    stage: str
    step: int
    plan_before: str
    plan_after: str
    detail: str = ""
    tokens_per_s_before: float = 0.0
    tokens_per_s_after: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class Placement(Readable):
    """Where one attempt ran: its Plan (JSON) and rank → node id."""

    attempt: int
    plan: str
    nodes: dict[int, str]


@dataclass(frozen=True)
class RecoveryReport(Readable):
    """One handled failure in the run's summary."""

    cause: str
    detail: str
    step: int
    decision: str
    plan_after: str
    recovery_s: float | None
    """Seconds from detection to the next completed step (None if the run never got there)."""


@dataclass(frozen=True)
class RunSummary(Readable):
    """How a run ended: state, the error if it failed, rank 0's result, the Plan, every placement and recovery."""

    state: str
    error: str
    result: RunResult | None
    plan: str | None
    placements: list[Placement]
    recoveries: list[RecoveryReport]
    growths: list[GrowthEvent] = field(default_factory=list)
    """Every growth re-plan, as measured (stage 'measured', or 'replanned' if the run ended before a measurement)."""
