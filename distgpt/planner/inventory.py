"""Cluster inventories: which devices exist, where, how they connect, what they cost. No Ray, no torch.

Sources: a small inventory file (TOML/YAML), a Ray cluster-launcher YAML (node types × max workers, instance types
mapped to GPUs), or — in the orchestrator — a live Ray cluster. Example inventory file::

    inter_site_gbps = 10             # between sites (cloud region ↔ on-prem), GB/s
    [[nodes]]
    name = "aws-h100"; device = "H100-SXM"; count = 8; replicas = 2; site = "aws-us-east-1"
    price_per_hour = 98.32; spot = false; network_gbps = 400
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from distgpt.errors import DistgptError
from distgpt.planner.hardware import DeviceType, device_type

# Cloud instance types → (device, GPUs per node, network GB/s). AWS EC2 and GCP Compute Engine product pages.
INSTANCE_TYPES: dict[str, tuple[str, int, float]] = {
    "p5.48xlarge": ("H100-SXM", 8, 400), "p5e.48xlarge": ("H200", 8, 400), "p4d.24xlarge": ("A100-40GB", 8, 50),
    "p4de.24xlarge": ("A100-80GB", 8, 50), "p3.16xlarge": ("V100", 8, 3.1), "p3dn.24xlarge": ("V100", 8, 12.5),
    "g6e.48xlarge": ("L40S", 8, 50), "g6e.12xlarge": ("L40S", 4, 12.5), "g6.48xlarge": ("L4", 8, 12.5),
    "g6.12xlarge": ("L4", 4, 5), "g5.48xlarge": ("A10G", 8, 12.5), "g5.12xlarge": ("A10G", 4, 5),
    "g5.xlarge": ("A10G", 1, 1.25), "g4dn.12xlarge": ("T4", 4, 6.25), "g4dn.xlarge": ("T4", 1, 3.1),
    "a3-highgpu-8g": ("H100-SXM", 8, 100), "a2-highgpu-8g": ("A100-40GB", 8, 12.5),
    "a2-ultragpu-8g": ("A100-80GB", 8, 12.5), "g2-standard-48": ("L4", 4, 12.5), "g2-standard-96": ("L4", 8, 12.5),
}


LABEL_DEVICE = "distgpt.io/device"
"""The node label naming a node's device type (the orchestrator's inventory reads the same labels)."""


class InventoryError(DistgptError, ValueError):
    """An inventory that cannot be used; the message names the entry and the fix."""


@dataclass(frozen=True)
class NodeGroup:
    """``replicas`` identical nodes, each with ``count`` devices of one type."""

    name: str
    device: DeviceType
    count: int
    replicas: int = 1
    site: str = "default"
    price_per_hour: float = 0.0
    """Per node, in any currency (cost per token is reported in the same unit)."""
    spot: bool = False
    network_bw: float = 12.5e9
    """Node network bandwidth (NIC), bytes/s."""

    @property
    def devices(self) -> int:
        """Devices in the whole group."""
        return self.count * self.replicas


@dataclass(frozen=True)
class Inventory:
    """All node groups, plus the bandwidth between sites."""

    groups: tuple[NodeGroup, ...]
    inter_site_bw: float = 1.25e9
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def total_devices(self) -> int:
        return sum(g.devices for g in self.groups)

    def by_type(self) -> dict[str, int]:
        """Device count per type name."""
        out: dict[str, int] = defaultdict(int)
        for g in self.groups:
            out[g.device.name] += g.devices
        return dict(out)

    def summary(self) -> str:
        """One line: '16× H100-SXM (aws) + 32× V100 (onprem)'."""
        return " + ".join(f"{g.devices}× {g.device.name} ({g.site})" for g in self.groups)


def _group(entry: dict[str, Any], where: str) -> NodeGroup:
    try:
        dev = device_type(str(entry["device"]))
        return NodeGroup(
            name=str(entry.get("name", dev.name)), device=dev, count=int(entry["count"]),
            replicas=int(entry.get("replicas", 1)), site=str(entry.get("site", "default")),
            price_per_hour=float(entry.get("price_per_hour", 0.0)), spot=bool(entry.get("spot", False)),
            network_bw=float(entry.get("network_gbps", 12.5)) * 1e9,
        )
    except KeyError as e:
        raise InventoryError(f"{where}: {e.args[0] if 'unknown device' in str(e) else f'missing key {e}'}") from None
    except (TypeError, ValueError) as e:
        raise InventoryError(f"{where}: {e}") from None


def inventory_from_dict(data: dict[str, Any], source: str = "inventory") -> Inventory:
    """Build from the parsed inventory-file structure (see module docstring)."""
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise InventoryError(f"{source}: needs a non-empty 'nodes' list of {{device, count, ...}} entries")
    groups = tuple(_group(n, f"{source}: nodes[{i}]") for i, n in enumerate(nodes))
    for g in groups:
        if g.count < 1 or g.replicas < 1:
            raise InventoryError(f"{source}: node group {g.name!r} needs count ≥ 1 and replicas ≥ 1")
    return Inventory(groups, float(data.get("inter_site_gbps", 1.25)) * 1e9)


def _load_mapping(path: Path) -> dict[str, Any]:
    """The file's top-level table; InventoryError naming the file for anything unreadable or not a table."""
    import yaml

    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise InventoryError(f"{path}: cannot be read as {'TOML' if path.suffix == '.toml' else 'YAML'} "
                             f"({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: expected a table (an inventory with 'nodes', or a Ray cluster YAML with "
                             f"'provider'), got a {type(data).__name__}")
    return data


def load_inventory(path: str | Path) -> Inventory:
    """An inventory file, a Ray cluster-launcher YAML (its 'provider' key) or a KubeRay RayCluster / RayJob."""
    p = Path(path)
    if not p.is_file():
        raise InventoryError(f"{p}: no such inventory file")
    data = _load_mapping(p)
    if data.get("kind") in ("RayCluster", "RayJob"):
        from distgpt.planner.node_types import inventory_from_node_types, node_types

        return inventory_from_node_types(node_types(data, str(p)), str(p))
    if "provider" in data:
        return inventory_from_ray_yaml(data, str(p))
    return inventory_from_dict(data, str(p))


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: expected a table, got {type(value).__name__} {value!r:.60}")
    return value


def inventory_from_ray_yaml(data: dict[str, Any], source: str = "cluster yaml") -> Inventory:
    """Node types of a Ray cluster-launcher config at their max worker counts.

    Devices come from the instance type (AWS/GCP tables above) or, for any provider, from a custom resource
    ``device:<TYPE>`` in the node type's ``resources`` (or in ``ray start --resources`` of the local provider).
    """
    provider = _table(data.get("provider"), f"{source}: provider")
    site = str(provider.get("region") or provider.get("availability_zone") or provider.get("type", "default"))
    groups: list[NodeGroup] = []
    for name, nt in _table(data.get("available_node_types"), f"{source}: available_node_types").items():
        where = f"{source}: available_node_types.{name}"
        nt = _table(nt, where)
        try:
            resources = _table(nt.get("resources"), f"{where}.resources")
            labels = _table(nt.get("labels"), f"{where}.labels")
            dev, count, net = _node_devices(_table(nt.get("node_config"), f"{where}.node_config"), resources)
            if labels.get(LABEL_DEVICE):  # distgpt's own labels win over the instance-type table
                dev = labels[LABEL_DEVICE]
                count = int(labels.get("distgpt.io/slots") or resources.get("GPU", count) or count)
            n = int(nt.get("max_workers", nt.get("min_workers", 0)))
            if dev and dev != "cpu" and count and n and labels.get("distgpt.io/slots") != "0":
                groups.append(NodeGroup(name, device_type(dev), count, n, str(labels.get("distgpt.io/site", site)),
                                        price_per_hour=float(labels.get("distgpt.io/price", 0.0)),
                                        spot=labels.get("distgpt.io/spot") == "true", network_bw=net * 1e9))
        except (TypeError, ValueError) as e:
            raise InventoryError(f"{where}: {e}") from None
        except KeyError as e:
            raise InventoryError(f"{where}: {e.args[0]}") from None
    if provider.get("type") == "local":
        ips = provider.get("worker_ips") or []  # the head runs Ray's services and the driver, not training
        dev, count = _local_devices(" ".join(data.get("worker_start_ray_commands", [])))
        if dev:
            groups.append(NodeGroup("local", device_type(dev), count, len([i for i in ips if i]), "onprem"))
    if not groups:
        raise InventoryError(f"{source}: found no node type with GPUs — use known instance types or declare a "
                             f"'device:<TYPE>' resource")
    return Inventory(tuple(groups))


def _node_devices(node_config: dict[str, Any], resources: dict[str, Any]) -> tuple[str | None, int, float]:
    for key, val in resources.items():
        if key.startswith("device:"):
            return key.split(":", 1)[1], int(val), 12.5
    itype = node_config.get("InstanceType") or node_config.get("machineType")
    if itype in INSTANCE_TYPES:
        dev, count, net = INSTANCE_TYPES[itype]
        return dev, count, net
    return None, 0, 0.0


def _local_devices(commands: str) -> tuple[str | None, int]:
    m = re.search(r'"device:([A-Za-z0-9_-]+)"\s*:\s*(\d+)', commands)
    return (m.group(1), int(m.group(2))) if m else (None, 0)
