"""The controller inside a Ray actor: wires the state machine to real worker groups, the planner and storage."""

from __future__ import annotations

from distgpt.config import JobConfig
from distgpt.orchestrator.autoscale import NodeTypes
from distgpt.orchestrator.controller import Controller, StartError
from distgpt.orchestrator.growth import Growth, GrowthWatch
from distgpt.orchestrator.inventory import RayNode, ray_nodes, to_inventory
from distgpt.orchestrator.placement import PlacementTimeout, Reserved
from distgpt.orchestrator.planning import best_on, plan_for
from distgpt.orchestrator.status import (
    Event,
    GrowthEvent,
    LogEvent,
    Placement,
    PlacementEvent,
    RecoveryReport,
    RunSummary,
)
from distgpt.orchestrator.worker_group import WorkerGroup
from distgpt.planner.plan import Plan
from distgpt.recovery.faults import parse_faults
from distgpt.recovery.policy import FailurePolicy
from distgpt.recovery.watchdog import Watchdog


class ControllerActor:
    """Runs one job's Controller; the driver calls ``run`` once and ``events`` repeatedly (a threaded actor)."""

    def __init__(self, job: JobConfig, plan: Plan, name: str, types: NodeTypes | None = None,
                 planned_on: list[RayNode] | None = None, reserved: Reserved | None = None):
        c = job.cluster
        self.reserved = reserved  # a Tune trial's placement group: every attempt places its ranks there
        self.job, self.name, self.attempt, self.types = job, name, 0, types or NodeTypes()
        self.placements: list[Placement] = []
        self.coordinator = None  # an RL run's rollout coordinator (a Ray actor), started with the first group
        self.ctrl = Controller(
            make_group=self._make_group,
            replan=self._replan,
            plan=plan,
            policy=FailurePolicy(c.max_failures),
            watchdog=Watchdog(c.hang_timeout_s, c.start_timeout_s + c.hang_timeout_s),
            faults=parse_faults(c.inject),
            committed_step=self._committed_step,
        )
        # The cluster the first Plan was made for: a node that joined since (even before this actor started) is growth
        self._known = planned_on if planned_on is not None else ray_nodes(c.cpus_per_worker)
        self._baseline: float | None = None  # the planner's tokens/s for the running Plan on self._known
        if c.grow == "replan":
            self.ctrl.growth = GrowthWatch(self._probe_growth, c.grow_check_s)

    def _replan(self, excluded: frozenset[str]) -> Plan:
        """The planner on what is left — or, on an autoscaling cluster, on what its node types can still build
        (the autoscaler replaces a lost node; the excluded ids stay out of the placement groups)."""
        self._baseline = None  # the next growth compares with the plan made now
        if self.types.path:
            return best_on(self.job, self.types.inventory()).plan
        return plan_for(self.job, ray_nodes(self.job.cluster.cpus_per_worker, excluded))

    def _probe_growth(self) -> Growth | None:
        """Joined nodes → the planner's best Plan on the grown cluster, if it predicts ≥ grow_min_gain more
        tokens/s than the running one; None while no node joined."""
        c = self.job.cluster
        nodes = ray_nodes(c.cpus_per_worker, self.ctrl.excluded)
        joined = [n for n in nodes if n.node_id not in {k.node_id for k in self._known}]
        if not joined:
            self._known = nodes  # a node may also have gone (failures handle that): compare with what is up
            return None
        before, self._known = self._known, nodes
        if self.types.path:
            return None  # the autoscaler started these for this run's own plan, made for all it can start
        what = ", ".join(sorted(f"{n.device} ×{n.slots}" for n in joined))
        if c.plan != "auto":
            return Growth(None, f"{len(joined)} node(s) joined ({what}); kept: cluster.plan = 'job' fixes the plan")
        if self._baseline is None:
            self._baseline = best_on(self.job, to_inventory(before)).tokens_per_s if before else 0.0
        best = best_on(self.job, to_inventory(nodes))
        gain = best.tokens_per_s / self._baseline - 1 if self._baseline else float("inf")
        detail = f"{len(joined)} node(s) joined ({what}); planner: {gain:+.0%} tokens/s with {best.plan.describe()}"
        if best.plan == self.ctrl.plan or gain < c.grow_min_gain:
            return Growth(None, f"{detail} — kept (below cluster.grow_min_gain = {c.grow_min_gain:.0%})")
        self._baseline = best.tokens_per_s
        return Growth(best.plan, detail)

    def _make_group(self, plan: Plan) -> WorkerGroup:
        self.attempt += 1
        nodes = ray_nodes(self.job.cluster.cpus_per_worker, self.ctrl.excluded)
        rl = self.job.objective.kind == "pg"
        try:
            group = WorkerGroup.create(self.job, plan, nodes, f"{self.name}-a{self.attempt}", self.ctrl.excluded,
                                       self.types.kinds(nodes), self.reserved, f"{self.name}-rollout" if rl else "")
        except PlacementTimeout as e:
            raise StartError(str(e)) from None
        if rl and self.coordinator is None:
            self._start_rollout(group, nodes)
        where = {}
        for rank, node in sorted(group.nodes.items()):
            where.setdefault(node[:12], []).append(rank)
        self.placements.append(Placement(self.attempt, plan.to_json(), dict(group.nodes)))
        self.ctrl.emit(PlacementEvent(self.attempt, plan.describe(), dict(group.nodes),
                                      "; ".join(f"node {n}: ranks {r}" for n, r in where.items())))
        return group

    def _start_rollout(self, group: WorkerGroup, nodes: list[RayNode]) -> None:
        """An RL run's rollout coordinator and its actors (once per run: they outlive learner restarts), placed by
        ``rl.placement`` next to the learner's first placement or on the rollout device's nodes."""
        from distgpt.orchestrator.coordinator import start_coordinator

        try:
            self.coordinator = start_coordinator(self.job, nodes, list(group.nodes.values()), f"{self.name}-rollout")
        except Exception as e:
            group.shutdown()
            raise StartError(f"the rollout actors did not start: {e}") from None
        self.ctrl.emit(LogEvent(f"[rollout] {self.job.rl.rollout_actors} rollout actor(s), {self.job.rl.placement}"))

    def _committed_step(self) -> int:
        # Imported here: it pulls in torch (~2 s), which the controller otherwise never needs — and the controller
        # starts before any worker, so its imports are on the path to the first step.
        from distgpt.checkpoint.manager import CheckpointManager

        done = CheckpointManager(self.job.checkpoint_uri).committed()
        return done[-1].step if done else -1

    def run(self) -> RunSummary:
        """Drive the run to its end; return the outcome (state, error, result, placements, recoveries)."""
        try:
            self.ctrl.run()
        except Exception as e:  # a controller bug must still end the run visibly, with the workers gone
            self.ctrl.error = f"controller error: {type(e).__name__}: {e}"
            if self.ctrl.group is not None:
                self.ctrl.group.shutdown()
            return self.summary("failed")
        return self.summary()

    def events(self, since: int) -> list[Event]:
        """Events from index ``since`` on."""
        return self.ctrl.events[since:]

    def summary(self, state: str | None = None) -> RunSummary:
        """The run's outcome so far."""
        c = self.ctrl
        recoveries = [RecoveryReport(r.failure.kind.value, r.failure.detail, r.failure.step, r.decision.value,
                                     r.plan_after, (r.resumed_at - r.detected_at) if r.resumed_at else None)
                      for r in c.recoveries]
        growths = [e for e in c.events if isinstance(e, GrowthEvent) and e.stage in ("replanned", "measured")]
        return RunSummary(state or c.state.value, c.error, c.result, c.plan.to_json() if c.plan else None,
                          list(self.placements), recoveries, growths)
