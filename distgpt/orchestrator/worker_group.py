"""The workers of one attempt: placement groups reserved from the Plan, one TrainWorker actor per rank, polled.

``WorkerGroup.create`` reserves, starts the actors and the process group, then returns; the controller polls it. Every
way a rank can be lost becomes a ``Failure``: an actor that died, a node that went away, an exception in training.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distgpt.config import JobConfig
from distgpt.orchestrator.drills import away_from
from distgpt.orchestrator.inventory import RayNode
from distgpt.orchestrator.placement import Reserved, group_specs, reserve
from distgpt.orchestrator.status import GroupStatus, RankStatus
from distgpt.orchestrator.worker import TrainWorker
from distgpt.planner.capacity import Kind
from distgpt.planner.plan import Plan
from distgpt.recovery.policy import Failure, FailureKind

POLL_TIMEOUT_S = 30.0


def _node_cpus() -> dict[str, float]:
    return {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}


def rank_threads(job: JobConfig, where: list[tuple[str, str]], node_cpus: dict[str, float],
                 machine_cores: int | None = None) -> list[int]:
    """torch threads per rank: ``train.threads`` when set; else every core a rank may use — its node's CPUs shared
    among this run's ranks on that node, and no more than the machine's cores shared among this run's ranks on
    that machine (simulated nodes on one host share its cores). Ray's default, one thread per reserved CPU, left a
    one-rank run on an embedded cluster at half this machine's speed. ``where``: (node id, ip) per rank."""
    if job.train.threads:
        return [job.train.threads] * len(where)
    cores = machine_cores or os.cpu_count() or 1
    per_node = Counter(node for node, _ in where)
    per_ip = Counter(ip for _, ip in where)
    floor = max(1, int(job.cluster.cpus_per_worker))
    return [max(floor, min(int(node_cpus.get(node, 0) // per_node[node]), cores // per_ip[ip]))
            for node, ip in where]


class WorkerGroup:
    """The actors of one attempt at running ``plan``."""

    def __init__(self, plan: Plan, actors: list, pgs: list, nodes: dict[int, str]):
        self.plan, self.actors, self.pgs, self.nodes = plan, actors, pgs, nodes
        self.last_step: int | None = None

    @classmethod
    def create(cls, job: JobConfig, plan: Plan, nodes: list[RayNode], name: str,
               exclude: frozenset[str] = frozenset(), kinds: dict[str, Kind] | None = None,
               reserved: Reserved | None = None, rollout: str = "") -> WorkerGroup:
        """Reserve placement, start one actor per rank (ranks in the Plan's order) and begin training. ``kinds``:
        how to place each device type (the autoscaler's node types too); default: the nodes that are up.
        ``reserved``: place the ranks in a placement group someone else holds (a Tune trial's) instead.
        ``rollout``: an RL run's rollout coordinator, by name (the ranks learn from its batches)."""
        c = job.cluster
        specs = group_specs(plan, nodes, c.cpus_per_worker, exclude, kinds)
        if reserved is None:
            pgs = reserve(specs, nodes, c.start_timeout_s, name)
            slots = [(pg, i) for pg, s in zip(pgs, specs, strict=True) for i in range(len(s.ranks))]
        else:
            pgs = []  # not ours to remove
            slots = [(reserved.pg, reserved.first + i) for i in range(plan.world_size)]
        actors: list = [None] * plan.world_size
        remote = ray.remote(TrainWorker)
        ranks = [(spec, rank) for spec in specs for rank in spec.ranks]
        for (spec, rank), (pg, bundle) in zip(ranks, slots, strict=True):
            actors[rank] = remote.options(
                num_cpus=c.cpus_per_worker, num_gpus=spec.bundle.get("GPU", 0), max_concurrency=4,
                name=f"{name}-rank{rank}", scheduling_strategy=PlacementGroupSchedulingStrategy(pg, bundle),
            ).remote(rank, plan.world_size)
        try:
            where = ray.get([a.address.remote() for a in actors], timeout=c.start_timeout_s)
        except (RayActorError, GetTimeoutError) as e:
            cls(plan, actors, pgs, {}).shutdown()
            raise RuntimeError(f"worker actors did not start: {e}") from e
        master = (where[0][1], where[0][2])
        threads = rank_threads(job, [(w[0], w[1]) for w in where], _node_cpus())
        ray.get([a.start.remote(job, plan, master, t, rollout) for a, t in zip(actors, threads, strict=True)])
        return cls(plan, actors, pgs, {rank: w[0] for rank, w in enumerate(where)})

    def poll(self) -> GroupStatus:
        """Poll every rank at once; translate deaths, lost nodes and training errors into a Failure."""
        st = GroupStatus()
        refs = [a.poll.remote() for a in self.actors]
        dead: list[int] = []
        states = []
        for rank, ref in enumerate(refs):
            try:
                r: RankStatus = ray.get(ref, timeout=POLL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):
                dead.append(rank)
                continue
            st.steps[rank] = r.step
            states.append(r.state)
            st.records += r.records
            st.logs += r.logs
            if r.state == "error" and st.failure is None:
                st.failure = Failure(FailureKind.TRAINING_ERROR, f"rank {rank}: {r.error}", r.step or 0, (rank,))
            if rank == 0:
                st.result = r.result
        if st.step is not None:
            self.last_step = st.step
        if dead:
            st.failure = self._death(dead)
        st.done = not dead and all(s == "done" for s in states)
        return st

    def _death(self, dead: list[int]) -> Failure:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = tuple(sorted({self.nodes[r] for r in dead if self.nodes.get(r) not in alive}))
        kind = FailureKind.NODE_LOST if lost else FailureKind.WORKER_DIED
        what = f"node {', '.join(n[:12] for n in lost)} lost" if lost else "actor died"
        return Failure(kind, f"rank {', '.join(map(str, dead))}: {what}", self.last_step or 0, tuple(dead), lost)

    def arm(self, faults: list) -> None:
        """Give each rank the injected faults it must fire itself (a node removal never on this, the controller's,
        node)."""
        faults = away_from(faults, self.nodes, ray.get_runtime_context().get_node_id())
        ray.get([a.arm.remote([f for f in faults if f.rank == r or f.kind == "preempt"])
                 for r, a in enumerate(self.actors)])

    def checkpoint_at(self, step: int) -> None:
        """Ask every rank to save after ``step``."""
        ray.get([a.checkpoint_at.remote(step) for a in self.actors], timeout=POLL_TIMEOUT_S)

    def shutdown(self) -> None:
        """Kill every actor (ranks stuck in a collective cannot be asked nicely) and free the placement groups."""
        for a in self.actors:
            if a is not None:
                ray.kill(a, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
        time.sleep(0.5)  # let the raylets reclaim the bundles before the next attempt reserves them
