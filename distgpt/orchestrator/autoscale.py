"""The autoscaler's side of a run: which node types it can start, what the Plan will make it start, and refusing a
Plan no node type can host before anything is reserved (its placement groups would otherwise pend forever)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from distgpt.config import JobConfig
from distgpt.errors import RunFailed
from distgpt.orchestrator.inventory import RayNode
from distgpt.orchestrator.placement import node_kinds
from distgpt.planner.capacity import Kind, NodeType, demand, fit, group_specs, kinds_of
from distgpt.planner.inventory import Inventory, load_inventory
from distgpt.planner.node_types import BOOTSTRAP_CONFIG, load_node_types
from distgpt.planner.plan import Plan


class UnplaceableError(RunFailed, RuntimeError):
    """No node type of the autoscaling config can host some placement group of the Plan."""


@dataclass(frozen=True)
class NodeTypes:
    """The autoscaler's node types for this run (``path`` '' and no types when the cluster does not autoscale)."""

    path: str = ""
    types: tuple[NodeType, ...] = field(default=())

    def inventory(self) -> Inventory:
        """The cluster these types can grow to, as the planner sees it (the same as ``distgpt plan --inventory``)."""
        return load_inventory(self.path)

    def kinds(self, nodes: list[RayNode]) -> dict[str, Kind]:
        """Device type → placement, for node types that may not exist yet and for the nodes that are up."""
        return {**kinds_of(list(self.types)), **node_kinds(nodes)}

    def demand(self, job: JobConfig, plan: Plan) -> str:
        """What the autoscaler will start for ``plan``; UnplaceableError naming each group that fits nowhere."""
        types = list(self.types)
        fitted = fit(group_specs(plan, kinds_of(types), job.cluster.cpus_per_worker), types)
        if not fitted.ok:
            raise UnplaceableError(
                f"no node type in {self.path} can host plan {plan.describe()}:\n  - " + "\n  - ".join(fitted.problems)
                + "\n  (checked before reserving anything: `distgpt cluster check` says the same)")
        return demand(fitted, types)


def node_types(setting: str) -> NodeTypes:
    """Resolve ``cluster.node_types``: a path, 'auto' (the launcher's bootstrap config when present) or 'none'."""
    if setting in ("", "none"):
        return NodeTypes()
    path = os.path.expanduser(BOOTSTRAP_CONFIG) if setting == "auto" else os.path.abspath(setting)
    if setting == "auto" and not os.path.isfile(path):
        return NodeTypes()
    return NodeTypes(path, tuple(load_node_types(path)))
