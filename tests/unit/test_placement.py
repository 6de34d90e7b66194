"""Ray's node list → inventory, and Plan → placement-group specs (pure functions; no Ray cluster needed)."""

from __future__ import annotations

import pytest

from distgpt.orchestrator.inventory import _describe, to_inventory
from distgpt.orchestrator.placement import group_specs
from distgpt.planner.inventory import InventoryError
from distgpt.planner.plan import Plan


def raw(node_id: str, cpus: float = 4, gpus: float = 0, labels=None, **res) -> dict:
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": "127.0.0.1",
            "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **res}, "Labels": labels or {}}


def test_nodes_are_typed_by_label_by_accelerator_or_as_cpu_slots():
    a100 = _describe(raw("a", labels={"distgpt.io/device": "a100-40g", "distgpt.io/site": "onprem",
                                      "distgpt.io/price": "3.5"}), 1.0)
    h100 = _describe(raw("h", cpus=64, gpus=8, **{"accelerator_type:H100": 1}), 1.0)
    cpu = _describe(raw("c", cpus=4), 2.0)
    assert (a100.device, a100.slots, a100.site, a100.price) == ("A100-40GB", 4, "onprem", 3.5)
    assert a100.selector == ("distgpt.io/device", "a100-40g")
    assert (h100.device, h100.slots, h100.gpus) == ("H100-SXM", 8, 8)
    assert (cpu.device, cpu.slots, cpu.selector) == ("cpu", 2, ("", ""))
    assert _describe(raw("head", cpus=0), 1.0) is None


def test_unknown_device_label_names_the_node_and_the_fix():
    with pytest.raises(InventoryError, match="distgpt.io/device"):
        _describe(raw("x", labels={"distgpt.io/device": "TPU-v9"}), 1.0)


def test_identical_nodes_become_one_group():
    nodes = [_describe(raw(n, labels={"distgpt.io/device": "L4"}), 1.0) for n in "abc"]
    inv = to_inventory(nodes + [_describe(raw("z", cpus=2), 1.0)])
    assert sorted((g.device.name, g.count, g.replicas) for g in inv.groups) == [("L4", 4, 3), ("cpu", 2, 1)]


def test_tp_groups_are_packed_and_stages_go_to_their_device_type():
    nodes = [_describe(raw("a", labels={"distgpt.io/device": "A100-40GB"}), 1.0),
             _describe(raw("l", labels={"distgpt.io/device": "L4"}), 1.0)]
    plan = Plan(dp=2, tp=2, pp=2, stage_devices=("A100-40GB", "L4"))
    specs = group_specs(plan, nodes, 1.0, exclude=frozenset({"zz"}))
    assert len(specs) == 4 and all(len(s.ranks) == 2 for s in specs)
    assert sorted(r for s in specs for r in s.ranks) == list(range(8))
    for s in specs:
        pp = plan.coords(s.ranks[0])["pp"]
        assert {plan.coords(r)["pp"] for r in s.ranks} == {pp}  # one TP group = one stage of one replica
        assert s.selector["distgpt.io/device"] == ("A100-40GB" if pp == 0 else "L4")
        assert s.selector["ray.io/node-id"] == "!in(zz)"
