"""Plans for a Ray cluster: the job's own Plan, or the planner's best one on the nodes Ray reports."""

from __future__ import annotations

from distgpt.config import JobConfig
from distgpt.errors import RunFailed
from distgpt.orchestrator.inventory import RayNode, to_inventory
from distgpt.planner.explain import nothing_fits
from distgpt.planner.plan import Plan
from distgpt.planner.search import search


class NoPlanError(RunFailed, RuntimeError):
    """No plan fits the cluster; the message is the planner's explanation."""


def plan_for(job: JobConfig, nodes: list[RayNode]) -> Plan:
    """The planner's best Plan for ``job`` on ``nodes`` (raises NoPlanError when nothing fits). Every Plan's
    checkpoints load into every other, so a re-plan may pick any of them."""
    inv = to_inventory(nodes)
    w = job.workload()
    res = search(w, inv, top=1)
    if not res.ranked:
        raise NoPlanError(nothing_fits(res, inv, w))
    return res.ranked[0].plan
