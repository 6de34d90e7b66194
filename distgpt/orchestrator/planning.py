"""Plans for a Ray cluster: the job's own Plan, or the planner's best one on the nodes Ray reports (or on the
cluster the autoscaler's node types can grow to)."""

from __future__ import annotations

from distgpt.config import JobConfig
from distgpt.errors import RunFailed
from distgpt.orchestrator.inventory import RayNode, to_inventory
from distgpt.planner.evaluate import Candidate
from distgpt.planner.explain import nothing_fits
from distgpt.planner.inventory import Inventory
from distgpt.planner.plan import Plan
from distgpt.planner.search import search


class NoPlanError(RunFailed, RuntimeError):
    """No plan fits the cluster; the message is the planner's explanation."""


def best_on(job: JobConfig, inv: Inventory) -> Candidate:
    """The planner's best candidate for ``job`` on ``inv`` (raises NoPlanError when nothing fits)."""
    w = job.workload()
    res = search(w, inv, top=1)
    if not res.ranked:
        raise NoPlanError(nothing_fits(res, inv, w))
    return res.ranked[0]


def plan_for(job: JobConfig, nodes: list[RayNode]) -> Plan:
    """The planner's best Plan for ``job`` on ``nodes`` (raises NoPlanError when nothing fits). Every Plan's
    checkpoints load into every other, so a re-plan may pick any of them."""
    return best_on(job, to_inventory(nodes)).plan
