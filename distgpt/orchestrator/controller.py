"""The controller: an explicit state machine that drives one run's worker groups. No training logic, no Ray calls.

    PLANNING → SCHEDULING → RUNNING → FINISHED
                  ▲            │ failure (actor death, node loss, hang, preemption, start failure)
                  └─ RECOVERING ┘ → policy: RESTART (same Plan) | REPLAN (planner on what is left) | RAISE → FAILED

Everything with side effects comes in from outside — a worker-group factory, a planner, a clock — so tests step it one
iteration at a time with fakes (``tests/unit/test_controller.py``); ``actor.py`` runs it inside a Ray actor. It talks
in the typed records of ``status.py`` and reaches fault drills through one hook (``drills.ControllerDrills``).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from distgpt.orchestrator.drills import ControllerDrills, Notice
from distgpt.orchestrator.growth import GrowthWatch
from distgpt.orchestrator.status import (
    Event,
    GroupStatus,
    GrowthEvent,
    LogEvent,
    RecordEvent,
    RecoveryEvent,
    ResumedEvent,
    StateEvent,
)
from distgpt.planner.plan import Plan
from distgpt.recovery.faults import Fault
from distgpt.recovery.policy import Decision, Failure, FailureKind, FailurePolicy
from distgpt.recovery.watchdog import Watchdog


class State(str, enum.Enum):
    PLANNING = "planning"
    SCHEDULING = "scheduling"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"


class Group(Protocol):
    """What the controller needs of a worker group (``WorkerGroup`` or a test fake)."""

    plan: Plan
    nodes: dict[int, str]

    def poll(self) -> GroupStatus: ...

    def arm(self, faults: list[Fault]) -> None: ...

    def checkpoint_at(self, step: int) -> None: ...

    def shutdown(self) -> None: ...


class StartError(RuntimeError):
    """Resources never came (placement timeout): not retried — the message says what is missing."""


@dataclass
class Recovery:
    """One handled failure, as logged and reported."""

    failure: Failure
    decision: Decision
    detected_at: float
    plan_after: str = ""
    resumed_at: float | None = None
    """When the new group completed its first step (recovery time = resumed_at - detected_at)."""


@dataclass
class Controller:
    """Drives a run to FINISHED or FAILED. Call ``step()`` repeatedly (``run()`` does, with a sleep between)."""

    make_group: Callable[[Plan], Group]
    replan: Callable[[frozenset[str]], Plan]
    """Planner on the cluster without the given node ids (lost or preempted)."""
    plan: Plan | None = None
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(300.0, 900.0))
    faults: list[Fault] = field(default_factory=list)
    committed_step: Callable[[], int] = lambda: -1
    """Latest committed checkpoint step (a preemption waits for its checkpoint before letting the node go)."""
    clock: Callable[[], float] = time.monotonic
    state: State = State.PLANNING
    group: Group | None = None
    events: list[Event] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    result: dict | None = None
    error: str = ""
    excluded: frozenset[str] = frozenset()
    growth: GrowthWatch = field(default_factory=GrowthWatch)
    """Elastic growth: its probe says when joined nodes make a better Plan (default: never)."""
    _failure: Failure | None = None
    _recorded: set[tuple[Any, Any]] = field(default_factory=set)  # (kind, step) of every record emitted
    _per_poll: int = 0  # steps the ranks ran between recent polls (a checkpoint notice must land ahead of them)
    _polled: int | None = None  # the step the last poll saw
    _preempt: Notice | None = None  # a pending preemption notice
    drills: ControllerDrills = field(init=False)

    def __post_init__(self) -> None:
        self.drills = ControllerDrills(self.faults)  # shares the list: ``faults`` shows what is still to fire

    def emit(self, event: Event) -> None:
        """Append an event for the driver (records, logs, state changes, recoveries), stamped with the time."""
        self.events.append(dataclasses.replace(event, time=time.time()))

    def _to(self, state: State, why: str = "") -> None:
        self.state = state
        self.emit(StateEvent(state.value, why))

    def step(self) -> State:
        """One iteration of the state machine."""
        handler = {State.PLANNING: self._plan, State.SCHEDULING: self._schedule, State.RUNNING: self._run,
                   State.RECOVERING: self._recover}.get(self.state)
        if handler is not None:
            handler()
        return self.state

    def run(self, interval_s: float = 0.2) -> State:
        """Step until FINISHED or FAILED."""
        while self.step() not in (State.FINISHED, State.FAILED):
            time.sleep(interval_s)
        return self.state

    def _plan(self) -> None:
        if self.plan is None:
            self.plan = self.replan(self.excluded)
        self._to(State.SCHEDULING, self.plan.describe())

    def _schedule(self) -> None:
        assert self.plan is not None
        try:
            self.group = self.make_group(self.plan)
        except StartError as e:
            self.error = str(e)
            self._to(State.FAILED, self.error)
            return
        except Exception as e:  # an actor that did not come up: a failure like any other
            self._fail(Failure(FailureKind.START_FAILED, f"{type(e).__name__}: {e}"))
            return
        self.watchdog.reset()
        self.drills.arm(self.group)
        self._to(State.RUNNING, f"{self.plan.world_size} workers on {len(set(self.group.nodes.values()))} nodes")

    def _run(self) -> None:
        assert self.group is not None
        st = self.group.poll()
        for r in st.records:
            self._record(r)
        for line in st.logs:
            self.emit(LogEvent(line))
        self.watchdog.observe(st.step)
        if st.step is not None:  # how far the ranks get between two polls: a checkpoint notice must land ahead
            last = st.step if self._polled is None else self._polled
            self._per_poll = max(self._per_poll // 2, st.step - last)
            self._polled = st.step
        if st.step is not None and self.recoveries and self.recoveries[-1].resumed_at is None \
                and self.watchdog.started:
            rec = self.recoveries[-1]
            rec.resumed_at = self.clock()
            self.emit(ResumedEvent(st.step, rec.resumed_at - rec.detected_at))
        if st.failure is not None:
            self._fail(st.failure)
        elif st.done:
            self.result = st.result
            self.group.shutdown()  # free the slots for whatever runs next
            self.group = None
            if (measured := self.growth.measured()) is not None:
                self.emit(measured)
            self._to(State.FINISHED, f"{st.step} steps")
        elif (waited := self.watchdog.expired()) is not None:
            self._fail(Failure(FailureKind.HANG, f"no step completed for {waited:.0f} s (watchdog)", st.step or 0))
        else:
            self._check_preemption()
            if self.state == State.RUNNING and self._preempt is None:
                self._check_growth(st.step or 0)

    def _record(self, r: dict) -> None:
        """Pass a metric record on. A resumed rank 0 replays the records its checkpoint carried (the lost attempt
        may have died before they were polled): those already emitted are dropped, the missing ones fill the gap.
        Records of steps re-run after a failure are not replays and always pass (they belong to the final run)."""
        key = (r.get("kind"), r.get("step"), r.get("source"))
        if r.pop("replayed", False) and key in self._recorded:
            return
        self._recorded.add(key)
        self.emit(RecordEvent(r))
        if (measured := self.growth.record(r, self.clock())) is not None:
            self.emit(measured)

    def _check_growth(self, step: int) -> None:
        """Nodes joined and the planner knows a better Plan: ask for a checkpoint two steps ahead, and once it is
        committed restart on the new Plan (it resumes from that checkpoint, resharded). Not a failure: it does not
        count against cluster.max_failures."""
        assert self.group is not None and self.plan is not None
        w, current = self.growth, self.plan.describe()
        if w.pending is None:
            g = w.check(self.clock())
            if g is not None and g.plan is None:
                self.emit(GrowthEvent("kept", step, current, current, g.detail))
            elif g is not None and g.plan is not None:
                at = step + self._ahead()
                w.pending = (at, g)
                self.group.checkpoint_at(at)
                self.emit(GrowthEvent("detected", step, current, g.plan.describe(), g.detail))
            return
        at, g = w.pending
        if self.committed_step() < at or g.plan is None:
            return
        w.pending = None
        self.group.shutdown()
        self.group = None
        self.plan = g.plan
        self.emit(GrowthEvent("replanned", at, current, g.plan.describe(), g.detail, w.before()))
        w.replanned(self.events[-1], self.clock())
        self._to(State.SCHEDULING, f"grow: {g.plan.describe()}")

    def _ahead(self) -> int:
        """Steps ahead of the last polled one at which to ask for a checkpoint: at least 2, and twice what the ranks
        ran between recent polls (fast steps outrun the poll; a rank already past the step would drain unsaved)."""
        return max(2, 2 * self._per_poll)

    def preempt(self, rank: int, step: int) -> None:
        """A preemption notice for ``rank``'s node: checkpoint two steps ahead (every rank gets there), then let the
        node go and re-plan without it."""
        assert self.group is not None
        at = step + self._ahead()
        self._preempt = (at, rank, self.group.nodes.get(rank, ""))
        self.group.checkpoint_at(at)

    def _check_preemption(self) -> None:
        """Once the checkpoint a preemption asked for is committed, the node may go: fail over without it."""
        assert self.group is not None
        drill = self.drills.preemption(self.group.nodes)
        if self._preempt is None and drill is not None:
            self._preempt = drill
        if self._preempt and self.committed_step() >= self._preempt[0]:
            self.drills.preempted()
            at, rank, node = self._preempt
            self._preempt = None
            self._fail(Failure(FailureKind.PREEMPTED, f"rank {rank}: node {node[:12]} preempted (checkpointed at "
                                                      f"step {at})", at, (rank,), (node,) if node else ()))

    def _fail(self, failure: Failure) -> None:
        self.drills.fired(failure)
        self._preempt = None
        self._failure = failure
        self.recoveries.append(Recovery(failure, Decision.RAISE, self.clock()))
        self._to(State.RECOVERING, f"{failure.kind.value}: {failure.detail}")

    def _recover(self) -> None:
        assert self._failure is not None
        failure, rec = self._failure, self.recoveries[-1]
        if self.group is not None:
            self.group.shutdown()  # every rank, also the healthy ones stuck in a collective
            self.group = None
        rec.decision = self.policy.decide(failure)
        if rec.decision == Decision.RAISE:
            self.error = f"{failure.kind.value}: {failure.detail}"
            if failure.kind != FailureKind.TRAINING_ERROR:
                self.error += f" (gave up after {self.policy.max_failures} recoveries: cluster.max_failures)"
            self._to(State.FAILED, self.error)
            return
        if rec.decision == Decision.REPLAN:
            self.excluded |= frozenset(failure.lost_nodes)
            try:
                self.plan = self.replan(self.excluded)
            except Exception as e:  # nothing fits on what is left
                self.error = f"{failure.kind.value}, and no plan fits the remaining cluster: {e}"
                self._to(State.FAILED, self.error)
                return
        assert self.plan is not None
        rec.plan_after = self.plan.describe()
        self.emit(RecoveryEvent(failure.kind.value, failure.detail, failure.step, rec.decision.value, rec.plan_after,
                                len(self.policy.seen)))
        self._to(State.SCHEDULING, rec.decision.value)
