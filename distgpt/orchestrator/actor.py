"""The controller inside a Ray actor: wires the state machine to real worker groups, the planner and storage."""

from __future__ import annotations

from distgpt.config import JobConfig
from distgpt.orchestrator.autoscale import NodeTypes
from distgpt.orchestrator.controller import Controller, StartError
from distgpt.orchestrator.inventory import ray_nodes
from distgpt.orchestrator.placement import PlacementTimeout
from distgpt.orchestrator.planning import best_on, plan_for
from distgpt.orchestrator.status import Event, Placement, PlacementEvent, RecoveryReport, RunSummary
from distgpt.orchestrator.worker_group import WorkerGroup
from distgpt.planner.plan import Plan
from distgpt.recovery.faults import parse_faults
from distgpt.recovery.policy import FailurePolicy
from distgpt.recovery.watchdog import Watchdog


class ControllerActor:
    """Runs one job's Controller; the driver calls ``run`` once and ``events`` repeatedly (a threaded actor)."""

    def __init__(self, job: JobConfig, plan: Plan, name: str, types: NodeTypes | None = None):
        c = job.cluster
        self.job, self.name, self.attempt, self.types = job, name, 0, types or NodeTypes()
        self.placements: list[Placement] = []
        self.ctrl = Controller(
            make_group=self._make_group,
            replan=self._replan,
            plan=plan,
            policy=FailurePolicy(c.max_failures),
            watchdog=Watchdog(c.hang_timeout_s, c.start_timeout_s + c.hang_timeout_s),
            faults=parse_faults(c.inject),
            committed_step=self._committed_step,
        )

    def _replan(self, excluded: frozenset[str]) -> Plan:
        """The planner on what is left — or, on an autoscaling cluster, on what its node types can still build
        (the autoscaler replaces a lost node; the excluded ids stay out of the placement groups)."""
        if self.types.path:
            return best_on(self.job, self.types.inventory()).plan
        return plan_for(self.job, ray_nodes(self.job.cluster.cpus_per_worker, excluded))

    def _make_group(self, plan: Plan) -> WorkerGroup:
        self.attempt += 1
        nodes = ray_nodes(self.job.cluster.cpus_per_worker, self.ctrl.excluded)
        try:
            group = WorkerGroup.create(self.job, plan, nodes, f"{self.name}-a{self.attempt}", self.ctrl.excluded,
                                       self.types.kinds(nodes))
        except PlacementTimeout as e:
            raise StartError(str(e)) from None
        where = {}
        for rank, node in sorted(group.nodes.items()):
            where.setdefault(node[:12], []).append(rank)
        self.placements.append(Placement(self.attempt, plan.to_json(), dict(group.nodes)))
        self.ctrl.emit(PlacementEvent(self.attempt, plan.describe(), dict(group.nodes),
                                      "; ".join(f"node {n}: ranks {r}" for n, r in where.items())))
        return group

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
        return RunSummary(state or c.state.value, c.error, c.result, c.plan.to_json() if c.plan else None,
                          list(self.placements), recoveries)
