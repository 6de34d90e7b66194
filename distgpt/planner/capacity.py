"""What an autoscaling cluster *can* hold: its node types, the placement groups a Plan asks for, and whether they fit.

Pure (no Ray, no torch), so ``distgpt cluster check`` answers in well under a second and the orchestrator can refuse a
Plan no node type can host before it reserves anything — an unplaceable placement group otherwise pends forever while
the autoscaler looks for a node type that does not exist.

Node types come from a Ray cluster-launcher YAML (``available_node_types``) or a KubeRay ``RayCluster`` manifest
(``workerGroupSpecs``); each declares its resources and the ``distgpt.io/*`` labels Ray starts its nodes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import LABEL_DEVICE
from distgpt.planner.plan import Plan

NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler may start, up to ``max_workers`` of them."""

    name: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    min_workers: int = 0
    max_workers: int = 0

    @property
    def device(self) -> str:
        """The ``distgpt.io/device`` label, else the GPU model of a known instance type, else 'cpu'."""
        name = self.labels.get(LABEL_DEVICE, "") or "cpu"
        try:
            return device_type(name).name
        except KeyError:
            return name

    @property
    def price(self) -> float:
        """Per node hour, from the ``distgpt.io/price`` label (0 when not declared)."""
        return float(self.labels.get("distgpt.io/price", 0) or 0)

    @property
    def hosts_training(self) -> bool:
        """False for a head or any type labelled ``distgpt.io/slots: "0"``."""
        return self.max_workers > 0 and self.labels.get("distgpt.io/slots") != "0"


@dataclass(frozen=True)
class GroupSpec:
    """One placement group: the ranks it hosts (bundle i ↔ ranks[i]), their device type and bundle shape."""

    ranks: tuple[int, ...]
    device: str | None
    bundle: dict[str, float]
    selector: dict[str, str]


@dataclass(frozen=True)
class Kind:
    """How to place a rank on one device type: the label selector, and whether such a node has GPUs."""

    selector: tuple[str, str]
    gpu: bool


def group_specs(plan: Plan, kinds: dict[str, Kind], cpus_per_worker: float,
                exclude: frozenset[str] = frozenset()) -> list[GroupSpec]:
    """The placement groups that host ``plan`` on a cluster with these device ``kinds``, avoiding the ``exclude``
    node ids (preempted or drained ones). One group per tensor-parallel group: its ranks talk every layer, so
    STRICT_PACK keeps them on one node."""
    names = sorted(kinds)
    specs = []
    for pp in range(plan.pp):
        for dp in range(plan.dp):
            device = _device_of(plan, pp, dp, names)
            # A device type the cluster does not have keeps its label: the group then waits for (or is refused
            # for want of) such a node instead of silently running on another type.
            all_gpu = bool(kinds) and all(k.gpu for k in kinds.values())
            kind = (kinds.get(device) or Kind((LABEL_DEVICE, device), all_gpu)) if device else None
            gpu = kind.gpu if kind else all_gpu
            bundle = {"CPU": cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
            ranks = tuple(plan.rank_of(dp=dp, tp=t, pp=pp) for t in range(plan.tp))
            selector = {kind.selector[0]: kind.selector[1]} if kind and kind.selector[0] else {}
            if exclude:
                selector[NODE_ID_LABEL] = f"!in({','.join(sorted(exclude))})"
            specs.append(GroupSpec(ranks, device, bundle, selector))
    return specs


def _device_of(plan: Plan, pp: int, dp: int, kinds: list[str]) -> str | None:
    """The device type the Plan gives (stage pp, replica dp); the only one when the cluster has one type."""
    if plan.stage_devices:
        return plan.stage_devices[pp]
    if plan.replica_devices:
        return plan.replica_devices[dp]
    return kinds[0] if len(kinds) == 1 else None


def kinds_of(types: list[NodeType]) -> dict[str, Kind]:
    """Device type → how to place on it, for the training node types of a cluster config."""
    out: dict[str, Kind] = {}
    for t in types:
        if t.hosts_training:
            sel = (LABEL_DEVICE, t.labels[LABEL_DEVICE]) if LABEL_DEVICE in t.labels else ("", "")
            out[t.device] = Kind(sel, t.resources.get("GPU", 0) > 0)
    return out


@dataclass
class Fit:
    """Nodes of each type a set of placement groups needs (first-fit decreasing), or why it cannot fit."""

    nodes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def price_per_hour(self, types: list[NodeType]) -> float:
        """What those nodes cost per hour at the types' ``distgpt.io/price`` labels."""
        price = {t.name: t.price for t in types}
        return sum(n * price.get(name, 0.0) for name, n in self.nodes.items())


def _matches(t: NodeType, selector: dict[str, str]) -> bool:
    return all(k == NODE_ID_LABEL or t.labels.get(k) == v for k, v in selector.items())


def _room(t: NodeType, need: dict[str, float]) -> bool:
    return all(t.resources.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def fit(specs: list[GroupSpec], types: list[NodeType]) -> Fit:
    """Can the autoscaler build nodes for every placement group? Each group (STRICT_PACK) must fit on one node of a
    type whose labels match its selector; groups share nodes first-fit, largest first; no type beyond max_workers.
    Groups that fail for the same reason are reported once, with their count."""
    out = Fit()
    open_nodes: list[tuple[NodeType, dict[str, float]]] = []  # (type, resources still free)
    why: dict[str, list[tuple[int, ...]]] = {}
    for s in sorted(specs, key=lambda s: -len(s.ranks)):
        need = {k: v * len(s.ranks) for k, v in s.bundle.items()}
        problem = _place(s, need, types, open_nodes, out.nodes)
        if problem:
            why.setdefault(problem, []).append(s.ranks)
    for problem, ranks in why.items():
        who = f"ranks {list(ranks[0])}" + (f" and {len(ranks) - 1} more group(s) like it" if len(ranks) > 1 else "")
        out.problems.append(f"{who}: {problem}")
    return out


def _place(s: GroupSpec, need: dict[str, float], types: list[NodeType],
           open_nodes: list[tuple[NodeType, dict[str, float]]], counts: dict[str, int]) -> str:
    """Put one group on an open node or a new one; '' on success, else why it cannot go anywhere."""
    eligible = [t for t in types if t.hosts_training and _matches(t, s.selector)]
    if not eligible:
        return f"need a node with {_selector_text(s)}: no node type has it ({_types_text(types)})"
    roomy = [t for t in eligible if _room(t, need)]
    if not roomy:
        big = max(eligible, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
        return (f"one tensor-parallel group must share one node and needs {_amounts(need)}; the largest matching "
                f"type {big.name!r} has {_resources_text(big)} — lower plan.tp or cluster.cpus_per_worker, or add a "
                f"larger node type")
    slot = next((n for n in open_nodes if _matches(n[0], s.selector)
                 and all(n[1].get(k, 0.0) + 1e-9 >= v for k, v in need.items())), None)
    if slot is None:
        free = [t for t in roomy if counts.get(t.name, 0) < t.max_workers]
        if not free:
            limits = ", ".join(f"{t.name} max_workers = {t.max_workers}" for t in roomy)
            return f"need more nodes than the config allows ({limits}) — raise max_workers or lower plan.dp/pp"
        t = min(free, key=lambda t: (t.price, t.name))
        counts[t.name] = counts.get(t.name, 0) + 1
        slot = (t, dict(t.resources))
        open_nodes.append(slot)
    for k, v in need.items():
        slot[1][k] = slot[1].get(k, 0.0) - v
    return ""


def _amounts(need: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))


def _selector_text(s: GroupSpec) -> str:
    sel = {k: v for k, v in s.selector.items() if k != NODE_ID_LABEL}
    what = ", ".join(f"{k}={v}" for k, v in sel.items()) or "any labels"
    return what + (f" and {s.bundle['GPU']:g} GPU per rank" if s.bundle.get("GPU") else "")


def _resources_text(t: NodeType) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(t.resources.items()) if v and (k in ("CPU", "GPU") or ":" in k))


def _types_text(types: list[NodeType]) -> str:
    rows = [f"{t.name}: {t.device}, {_resources_text(t)}, max {t.max_workers}" for t in types if t.hosts_training]
    return "; ".join(rows) or "none that hosts training"


def demand(fitted: Fit, types: list[NodeType]) -> str:
    """One line: which nodes of which type the plan needs and their price per hour."""
    by = {t.name: t for t in types}
    parts = [f"{n}× {name} ({by[name].device}{f', {by[name].price:g}/h each' if by[name].price else ''})"
             for name, n in sorted(fitted.nodes.items())]
    total = fitted.price_per_hour(types)
    return ", ".join(parts) + (f" = {total:.2f} per hour" if total else "")
