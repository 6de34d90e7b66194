"""The controller's state machine, stepped one iteration at a time with a fake worker group (no Ray, no actors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from distgpt.orchestrator.controller import Controller, StartError, State
from distgpt.orchestrator.status import GroupStatus
from distgpt.planner.plan import Plan
from distgpt.recovery.faults import FaultError, parse_faults
from distgpt.recovery.policy import Decision, Failure, FailureKind, FailurePolicy
from distgpt.recovery.watchdog import Watchdog


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeGroup:
    """Reports the scripted statuses in order; records what the controller asked of it."""

    plan: Plan
    script: list[GroupStatus]
    nodes: dict[int, str] = field(default_factory=lambda: {0: "node-a", 1: "node-b"})
    calls: list[tuple] = field(default_factory=list)

    def poll(self) -> GroupStatus:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def arm(self, faults) -> None:
        self.calls.append(("arm", [(f.kind, f.step) for f in faults]))

    def checkpoint_at(self, step: int) -> None:
        self.calls.append(("checkpoint_at", step))

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))


def status(step: int | None, **kw) -> GroupStatus:
    return GroupStatus(steps={0: step, 1: step}, **kw)


def make(scripts: list[list[GroupStatus]], **kw) -> tuple[Controller, list[FakeGroup], list[frozenset]]:
    groups: list[FakeGroup] = []
    replans: list[frozenset] = []

    def make_group(plan: Plan) -> FakeGroup:
        groups.append(FakeGroup(plan, scripts[len(groups)]))
        return groups[-1]

    def replan(excluded: frozenset) -> Plan:
        replans.append(excluded)
        return Plan(dp=1)

    return Controller(make_group, replan, plan=Plan(dp=2), **kw), groups, replans


def test_happy_path_plans_schedules_runs_and_finishes():
    done = status(3, done=True, result={"steps": 3})
    ctrl, groups, _ = make([[status(0, records=[{"step": 0}]), status(1), done]])
    assert [ctrl.step() for _ in range(5)] == [State.SCHEDULING, State.RUNNING, State.RUNNING, State.RUNNING,
                                               State.FINISHED]
    assert ctrl.result == {"steps": 3}
    assert [e["record"] for e in ctrl.events if e["kind"] == "record"] == [{"step": 0}]


def test_records_a_lost_attempt_never_delivered_are_filled_in_from_the_checkpoints_replay():
    """The first attempt delivered steps 1-2, then died with 3-4 still in the worker (covered by the checkpoint at
    step 4). The resumed rank 0 replays 1-4 from that checkpoint: 3-4 fill the gap, 1-2 are dropped as duplicates;
    re-run steps (5) pass even though the first attempt reported them too."""
    rec = [{"step": i, "loss": 1.0 / i} for i in range(1, 7)]
    died = status(5, records=[rec[4]], failure=Failure(FailureKind.WORKER_DIED, "rank 0 died", 5, (0,)))
    replayed = [{**r, "replayed": True} for r in rec[:4]]
    ctrl, _, _ = make([[status(2, records=rec[:2]), died],
                       [status(4, records=replayed), status(6, records=[rec[4], rec[5]], done=True)]])
    while ctrl.step() not in (State.FINISHED, State.FAILED):
        pass
    assert ctrl.state == State.FINISHED
    got = [e["record"] for e in ctrl.events if e["kind"] == "record"]
    assert [r["step"] for r in got] == [1, 2, 5, 3, 4, 5, 6]
    assert all("replayed" not in r for r in got)


def test_worker_death_restarts_with_the_same_plan_and_reports_recovery_time():
    clock = Clock()
    died = status(5, failure=Failure(FailureKind.WORKER_DIED, "rank 1: actor died", 5, (1,)))
    ctrl, groups, replans = make([[status(4), died], [status(3), status(6, done=True)]], clock=clock,
                                 watchdog=Watchdog(60, 60, clock))
    for _ in range(4):
        ctrl.step()
    assert ctrl.state == State.RECOVERING and ("shutdown",) not in groups[0].calls
    clock.t = 2.0
    ctrl.step()
    assert ("shutdown",) in groups[0].calls and ctrl.state == State.SCHEDULING and not replans
    ctrl.step()
    assert groups[1].plan == Plan(dp=2)
    clock.t = 9.0
    ctrl.step()  # baseline (resumed from the checkpoint at step 3)
    ctrl.step()  # step 6 completed, and done
    assert ctrl.state == State.FINISHED
    assert ctrl.recoveries[0].decision == Decision.RESTART
    assert ctrl.recoveries[0].resumed_at - ctrl.recoveries[0].detected_at == pytest.approx(9.0)


def test_node_loss_replans_without_the_lost_node():
    lost = status(5, failure=Failure(FailureKind.NODE_LOST, "node gone", 5, (1,), ("node-b",)))
    ctrl, groups, replans = make([[lost], [status(6, done=True)]])
    for _ in range(5):
        ctrl.step()
    assert replans == [frozenset({"node-b"})] and groups[1].plan == Plan(dp=1)
    assert ctrl.recoveries[0].plan_after == Plan(dp=1).describe()
    assert any(e["kind"] == "recovery" and e["decision"] == "replan" for e in ctrl.events)


def test_watchdog_turns_a_stall_into_a_hang_failure():
    clock = Clock()
    ctrl, groups, _ = make([[status(0), status(1), status(1)], [status(1, done=True)]], clock=clock,
                           watchdog=Watchdog(10, 100, clock))
    for _ in range(4):
        ctrl.step()
    clock.t = 5.0
    assert ctrl.step() == State.RUNNING
    clock.t = 11.0
    assert ctrl.step() == State.RECOVERING
    assert ctrl.recoveries[0].failure.kind == FailureKind.HANG


def test_max_failures_then_failed_with_the_cause():
    died = status(2, failure=Failure(FailureKind.WORKER_DIED, "rank 0: actor died", 2, (0,)))
    ctrl, _, _ = make([[died]] * 3, policy=FailurePolicy(max_failures=1))
    for _ in range(20):
        if ctrl.step() == State.FAILED:
            break
    assert ctrl.state == State.FAILED and "max_failures" in ctrl.error and "actor died" in ctrl.error


def test_training_error_is_not_retried():
    bad = status(1, failure=Failure(FailureKind.TRAINING_ERROR, "rank 0: ValueError: bad", 1, (0,)))
    ctrl, groups, _ = make([[bad]])
    for _ in range(4):
        ctrl.step()
    assert ctrl.state == State.FAILED and len(groups) == 1 and "ValueError" in ctrl.error


def test_start_error_fails_at_once_with_the_message():
    def make_group(plan):
        raise StartError("needs 8 slots, the cluster has 4")

    ctrl = Controller(make_group, lambda ex: Plan(), plan=Plan(dp=8))
    ctrl.step()
    assert ctrl.step() == State.FAILED and "needs 8 slots" in ctrl.error


def test_injected_faults_are_armed_until_they_fire():
    died = status(4, failure=Failure(FailureKind.WORKER_DIED, "rank 1: actor died", 4, (1,)))
    ctrl, groups, _ = make([[died], [status(9, done=True)]], faults=parse_faults(["kill@4:1", "hang@7:0"]))
    for _ in range(6):
        ctrl.step()
    assert groups[0].calls[0] == ("arm", [("kill", 4), ("hang", 7)])
    assert groups[1].calls[0] == ("arm", [("hang", 7)])  # the kill fired once; it is not armed again


def test_preemption_drill_waits_for_its_checkpoint_then_replans_without_the_node():
    committed = {"step": -1}
    ctrl, groups, replans = make([[status(3), status(4), status(5)], [status(5, done=True)]],
                                 faults=parse_faults(["preempt@3:1"]), committed_step=lambda: committed["step"])
    for _ in range(4):
        ctrl.step()
    assert groups[0].calls[0] == ("arm", [("preempt", 3)]) and ctrl.state == State.RUNNING
    committed["step"] = 3
    ctrl.step()
    assert ctrl.state == State.RECOVERING and ctrl.recoveries[0].failure.kind == FailureKind.PREEMPTED
    ctrl.step()
    assert replans == [frozenset({"node-b"})] and ctrl.faults == []


def test_preemption_notice_asks_for_a_checkpoint_ahead():
    ctrl, groups, _ = make([[status(3)]])
    for _ in range(3):
        ctrl.step()
    ctrl.preempt(rank=0, step=3)
    assert ("checkpoint_at", 5) in groups[0].calls


@pytest.mark.parametrize("spec", ["kill", "kill@x", "boom@3", "kill@0", "kill@3:-1"])
def test_bad_fault_specs_are_rejected(spec):
    with pytest.raises(FaultError, match="kind@STEP:RANK|kind must be"):
        parse_faults([spec])


def test_policy_decisions():
    p = FailurePolicy(max_failures=3)
    assert p.decide(Failure(FailureKind.WORKER_DIED, "")) == Decision.RESTART
    assert p.decide(Failure(FailureKind.HANG, "")) == Decision.RESTART
    assert p.decide(Failure(FailureKind.NODE_LOST, "", lost_nodes=("n",))) == Decision.REPLAN
    assert p.decide(Failure(FailureKind.WORKER_DIED, "")) == Decision.RAISE  # the fourth


def _step_rec(step: int, tps: float) -> dict:
    return {"step": step, "loss": 1.0, "tokens_per_s": tps}


def test_growth_checkpoints_then_restarts_on_the_grown_plan_and_measures_both_sides():
    from distgpt.orchestrator.growth import Growth, GrowthWatch

    grown = Plan(dp=4)
    asked: list[int] = []

    def probe():
        asked.append(1)
        return Growth(grown, "2 node(s) joined (L4 ×2)") if len(asked) == 2 else None

    committed = {"step": -1}
    first = [status(s, records=[_step_rec(s, 100.0 + s)]) for s in (1, 2, 3)] + [status(4)]
    second = [status(s, records=[_step_rec(s, 300.0)]) for s in (5, 6, 7, 8)] + [status(8, done=True)]
    clock = Clock()
    ctrl, groups, replans = make([first, second], clock=clock, committed_step=lambda: committed["step"])
    ctrl.growth = GrowthWatch(probe, every_s=1.0)
    ctrl.step()  # planning
    ctrl.step()  # scheduling
    for _ in range(2):  # steps 1-2; the probe runs at most once a second and finds growth the second time
        clock.t += 1.0
        ctrl.step()
    assert ("checkpoint_at", 4) in groups[0].calls and ctrl.state == State.RUNNING
    assert [e.stage for e in ctrl.events if e.kind == "growth"] == ["detected"]
    for _ in range(2):
        clock.t += 1.0
        ctrl.step()  # steps 3-4 polled, but the checkpoint is not committed yet: keep running
    assert ctrl.state == State.RUNNING and ("shutdown",) not in groups[0].calls and len(asked) == 2
    committed["step"] = 4
    ctrl.step()
    assert ctrl.state == State.SCHEDULING and ("shutdown",) in groups[0].calls and ctrl.plan == grown
    while ctrl.step() not in (State.FINISHED, State.FAILED):
        clock.t += 1.0
    assert groups[1].plan == grown and ctrl.state == State.FINISHED and not ctrl.recoveries and not replans
    g = {e.stage: e for e in ctrl.events if e.kind == "growth"}
    assert g["replanned"].tokens_per_s_before == pytest.approx((101 + 102 + 103) / 3) and g["replanned"].step == 4
    assert g["measured"].tokens_per_s_after == pytest.approx(300.0) and g["measured"].plan_after == grown.describe()


def test_growth_the_planner_sees_no_gain_in_is_reported_and_kept():
    from distgpt.orchestrator.growth import Growth, GrowthWatch

    ctrl, groups, _ = make([[status(1), status(2), status(3, done=True)]])
    ctrl.growth = GrowthWatch(lambda: Growth(None, "1 node(s) joined (L4 ×2) — kept"), every_s=0.0)
    ctrl.run(interval_s=0)
    assert [e.stage for e in ctrl.events if e.kind == "growth"][:1] == ["kept"]
    assert len(groups) == 1 and ctrl.state == State.FINISHED
