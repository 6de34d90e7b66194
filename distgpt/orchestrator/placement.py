"""Plan → placement groups. One group per tensor-parallel group (its ranks talk every layer, so STRICT_PACK keeps them
on one node); each group's bundles carry the label selector of the device type the Plan gave its stage or replica.

Ranks follow the Plan's rank order: the group of (stage pp, replica dp) holds ranks ``rank_of(dp, tp=0..tp-1, pp)``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from distgpt.orchestrator.inventory import RayNode
from distgpt.planner import capacity
from distgpt.planner.capacity import GroupSpec, Kind
from distgpt.planner.plan import Plan


class PlacementTimeout(RuntimeError):
    """The cluster could not host the Plan within the start timeout; the message says what is missing."""


@dataclass(frozen=True)
class Reserved:
    """A placement group reserved by someone else — a Ray Tune trial's, through its resource request. Its bundles
    from ``first`` on hold the ranks in the order of ``group_specs``; the reserver, not the worker group, removes it."""

    pg: PlacementGroup
    first: int = 0


def trial_bundles(specs: list[GroupSpec]) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """The bundles (and their label selectors) one reservation needs for ``specs``: one per rank, in the order of
    the specs (``Reserved`` assigns them that way)."""
    bundles: list[dict[str, float]] = []
    selectors: list[dict[str, str]] = []
    for s in specs:
        bundles += [dict(s.bundle) for _ in s.ranks]
        selectors += [dict(s.selector) for _ in s.ranks]
    return bundles, selectors


def node_kinds(nodes: list[RayNode]) -> dict[str, Kind]:
    """Device type → how to place a rank on the nodes of that type that are up."""
    return {n.device: Kind(n.selector, n.gpus > 0) for n in nodes}


def group_specs(plan: Plan, nodes: list[RayNode], cpus_per_worker: float, exclude: frozenset[str] = frozenset(),
                kinds: dict[str, Kind] | None = None) -> list[GroupSpec]:
    """The placement groups that host ``plan`` on the nodes that are up now, or on the device ``kinds`` given
    (the autoscaler's node types, which may have no node yet) — pure: no Ray calls."""
    if kinds is None:
        kinds = node_kinds(nodes)
    return capacity.group_specs(plan, kinds, cpus_per_worker, exclude)


def reserve(specs: list[GroupSpec], nodes: list[RayNode], timeout_s: float, name: str) -> list[PlacementGroup]:
    """Create every placement group and wait for all (the autoscaler may add nodes meanwhile). On timeout, remove them
    and raise PlacementTimeout naming what is missing against what the cluster has."""
    pgs = [placement_group([dict(s.bundle) for _ in s.ranks], strategy="STRICT_PACK", name=f"{name}-g{i}",
                           bundle_label_selector=[dict(s.selector) for _ in s.ranks] if s.selector else None)
           for i, s in enumerate(specs)]
    start = time.monotonic()
    pending = [pg.ready() for pg in pgs]
    while pending and time.monotonic() - start < timeout_s:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(5.0, timeout_s))
    if pending:
        for pg in pgs:
            remove_placement_group(pg)
        raise PlacementTimeout(_missing(specs, nodes, timeout_s))
    return pgs


def _missing(specs: list[GroupSpec], nodes: list[RayNode], timeout_s: float) -> str:
    need = Counter()
    for s in specs:
        need[s.device or "any"] += len(s.ranks)
    have = Counter()
    for n in nodes:
        have[n.device] += n.slots
    biggest = max(len(s.ranks) for s in specs)
    lines = [f"the cluster could not host the plan within {timeout_s:.0f} s (cluster.start_timeout_s):"]
    for dev, n in sorted(need.items()):
        avail = sum(have.values()) if dev == "any" else have.get(dev, 0)
        lines.append(f"  - {dev}: the plan needs {n} slots, the cluster has {avail}")
    lines.append(f"  - each tensor-parallel group needs {biggest} slots on one node; largest node has "
                 f"{max((n.slots for n in nodes), default=0)}")
    lines.append("  fix: add nodes (or let the autoscaler finish), free resources held by other jobs, or lower "
                 "plan.dp/tp/pp — `cluster.plan = \"auto\"` fits the plan to what is there")
    return "\n".join(lines)
