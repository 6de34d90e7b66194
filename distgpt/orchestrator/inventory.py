"""The cluster as Ray reports it → the planner's Inventory, plus how to place a bundle on each device type.

A node says what it is with labels (``ray start --labels='{"distgpt.io/device": "A100-40GB", ...}'``):
``distgpt.io/device`` (device type), ``distgpt.io/site`` (cloud region or on-prem), ``distgpt.io/price`` (per node
hour), ``distgpt.io/spot`` ("true"), ``distgpt.io/slots`` (worker slots). Without labels, a GPU node is typed by Ray's
``accelerator_type:<X>`` resource and has one slot per GPU; a CPU-only node has one ``cpu`` slot per
``cpus_per_worker`` CPUs. The head node of a cluster started with ``--num-cpus=0`` has no slots and is skipped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import ray

from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import Inventory, InventoryError, NodeGroup

LABEL = "distgpt.io/"
RAY_ACCEL_LABEL = "ray.io/accelerator-type"


@dataclass(frozen=True)
class RayNode:
    """One alive Ray node as the planner and placement see it."""

    node_id: str
    ip: str
    device: str
    """Canonical device type name (hardware catalog)."""
    slots: int
    gpus: int
    site: str = "default"
    price: float = 0.0
    spot: bool = False
    selector: tuple[str, str] = ("", "")
    """(label, value) that selects nodes of this device type in a placement-group bundle ('' for any node)."""


def _describe(raw: dict, cpus_per_worker: float) -> RayNode | None:
    res, labels = raw.get("Resources", {}), raw.get("Labels", {}) or {}
    gpus = int(res.get("GPU", 0))
    accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "")
    if LABEL + "device" in labels:
        name, selector = labels[LABEL + "device"], (LABEL + "device", labels[LABEL + "device"])
    elif gpus and accel:
        name, selector = accel, (RAY_ACCEL_LABEL, labels.get(RAY_ACCEL_LABEL, accel))
    else:
        name, selector = ("GPU" if gpus else "cpu"), ("", "")
    slots = int(labels.get(LABEL + "slots", gpus or int(res.get("CPU", 0) // cpus_per_worker)))
    if slots <= 0:
        return None
    try:
        canonical = device_type(name).name
    except KeyError as e:
        raise InventoryError(f"Ray node {raw['NodeID'][:12]} ({raw.get('NodeManagerAddress')}): {e.args[0]} — "
                             f"label it with {LABEL}device=<a known type>") from None
    return RayNode(raw["NodeID"], raw.get("NodeManagerAddress", ""), canonical, slots, gpus,
                   labels.get(LABEL + "site", "default"), float(labels.get(LABEL + "price", 0) or 0),
                   labels.get(LABEL + "spot", "").lower() == "true", selector)


def ray_nodes(cpus_per_worker: float = 1.0, exclude: frozenset[str] = frozenset()) -> list[RayNode]:
    """Alive nodes with at least one worker slot, minus ``exclude`` (node ids being drained or preempted)."""
    out = []
    for raw in ray.nodes():
        if not raw.get("Alive") or raw["NodeID"] in exclude:
            continue
        node = _describe(raw, cpus_per_worker)
        if node is not None:
            out.append(node)
    return out


def to_inventory(nodes: list[RayNode]) -> Inventory:
    """Group identical nodes (type, slots, site, price, spot) into the planner's NodeGroups."""
    if not nodes:
        raise InventoryError("the Ray cluster has no node with a free worker slot — add nodes (or CPUs) and retry")
    groups: dict[tuple, int] = defaultdict(int)
    for n in nodes:
        groups[(n.device, n.slots, n.site, n.price, n.spot)] += 1
    return Inventory(tuple(
        NodeGroup(f"{site}-{dev}-x{slots}", device_type(dev), slots, replicas, site, price, spot)
        for (dev, slots, site, price, spot), replicas in sorted(groups.items())
    ))

