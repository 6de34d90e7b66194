"""Node types of an autoscaling cluster, read from the config the autoscaler itself reads. No Ray, no torch.

- A Ray cluster-launcher YAML: ``available_node_types.<name>`` with ``resources``, ``labels``, ``min/max_workers``
  (on a launched cluster the head holds it as ``~/ray_bootstrap_config.yaml``). Known cloud instance types fill in
  GPUs a node type does not declare.
- A KubeRay ``RayCluster`` (or the ``rayClusterSpec`` of a ``RayJob``): each ``workerGroupSpecs`` entry, with its
  ``maxReplicas``, container ``limits`` (``cpu``, ``nvidia.com/gpu``) and ``rayStartParams`` (``num-gpus``,
  ``resources``, ``labels``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distgpt.planner.capacity import NodeType
from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import (
    INSTANCE_TYPES,
    Inventory,
    InventoryError,
    NodeGroup,
    _load_mapping,
    _table,
)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where the cluster launcher leaves the cluster's config on its head node."""


def load_node_types(path: str | Path) -> list[NodeType]:
    """The node types of a cluster-launcher YAML/JSON or a KubeRay manifest; InventoryError naming the problem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InventoryError(f"{p}: no such cluster config — give a Ray cluster-launcher YAML or a KubeRay RayCluster")
    data = _load_mapping(p)
    types = node_types(data, str(p))
    if not any(t.hosts_training for t in types):
        raise InventoryError(f"{p}: no node type can host training (every type has max_workers 0 or "
                             f"distgpt.io/slots \"0\") — add a worker type with max_workers ≥ 1")
    return types


def node_types(data: dict[str, Any], source: str) -> list[NodeType]:
    """Dispatch on the config's shape: ``kind: RayCluster/RayJob`` (KubeRay) or ``available_node_types``."""
    if data.get("kind") in ("RayCluster", "RayJob"):
        spec = _table(data.get("spec"), f"{source}: spec")
        if data["kind"] == "RayJob":
            if "rayClusterSpec" not in spec:
                raise InventoryError(f"{source}: this RayJob runs on an existing cluster (clusterSelector) — give "
                                     f"that cluster's RayCluster manifest instead")
            spec = _table(spec.get("rayClusterSpec"), f"{source}: spec.rayClusterSpec")
        return [_kuberay_group(g, f"{source}: workerGroupSpecs[{i}]")
                for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    types = _table(data.get("available_node_types"), f"{source}: available_node_types")
    if not types:
        raise InventoryError(f"{source}: no available_node_types — the local provider has fixed nodes; plan for it "
                             f"with `distgpt plan --inventory {source}`")
    return [_launcher_type(name, nt, f"{source}: available_node_types.{name}") for name, nt in types.items()]


def _launcher_type(name: str, nt: Any, where: str) -> NodeType:
    nt = _table(nt, where)
    try:
        resources = {str(k): float(v) for k, v in _table(nt.get("resources"), f"{where}.resources").items()}
        labels = {str(k): str(v) for k, v in _table(nt.get("labels"), f"{where}.labels").items()}
        itype = _table(nt.get("node_config"), f"{where}.node_config")
        itype = itype.get("InstanceType") or itype.get("machineType")
        if itype in INSTANCE_TYPES:  # fill in what the launcher would detect on the instance
            dev, gpus, _ = INSTANCE_TYPES[itype]
            resources.setdefault("GPU", float(gpus))
            labels.setdefault("distgpt.io/device", dev)
        return NodeType(name, resources, labels, int(nt.get("min_workers", 0)), int(nt.get("max_workers", 0)))
    except (TypeError, ValueError) as e:
        raise InventoryError(f"{where}: {e}") from None


def _kuberay_group(g: Any, where: str) -> NodeType:
    g = _table(g, where)
    try:
        params = _table(g.get("rayStartParams"), f"{where}.rayStartParams")
        containers = _table(g.get("template"), f"{where}.template").get("spec", {}).get("containers") or [{}]
        limits = _table(containers[0].get("resources", {}).get("limits"), f"{where}.limits")
        resources = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                     "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        resources.update({str(k): float(v) for k, v in json.loads(params.get("resources", "{}") or "{}").items()})
        labels = {str(k): str(v) for k, v in json.loads(params.get("labels", "{}") or "{}").items()}
        return NodeType(str(g.get("groupName", where)), resources, labels, int(g.get("minReplicas", 0)),
                        int(g.get("maxReplicas", 0)))
    except (TypeError, ValueError, AttributeError) as e:
        raise InventoryError(f"{where}: {e}") from None


def _quantity(v: Any) -> float:
    """A Kubernetes quantity of whole units ('8', '500m')."""
    s = str(v).strip()
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def inventory_from_node_types(types: list[NodeType], source: str) -> Inventory:
    """The planner's Inventory for the cluster these node types can grow to (each type at ``max_workers``)."""
    groups = []
    for t in types:
        slots = int(t.labels.get("distgpt.io/slots", 0) or t.resources.get("GPU", 0))
        if not t.hosts_training or not slots or t.device == "cpu":
            continue
        try:
            dev = device_type(t.device)
        except KeyError as e:
            raise InventoryError(f"{source}: node type {t.name!r}: {e.args[0]}") from None
        groups.append(NodeGroup(t.name, dev, slots, t.max_workers, t.labels.get("distgpt.io/site", "default"),
                                t.price, t.labels.get("distgpt.io/spot") == "true"))
    if not groups:
        raise InventoryError(f"{source}: no node type with GPUs (or distgpt.io/slots) and a distgpt.io/device label")
    return Inventory(tuple(groups))
