"""Node types of cluster configs, the placement groups a Plan asks for, and whether the autoscaler can host them
(``distgpt cluster check``, the node line of ``distgpt plan``). Pure: no Ray."""

from __future__ import annotations

import json

import pytest

from distgpt.cli import main
from distgpt.planner.capacity import Kind, fit, group_specs, kinds_of
from distgpt.planner.inventory import InventoryError, load_inventory
from distgpt.planner.node_types import load_node_types
from distgpt.planner.plan import Plan

from ..conftest import REPO

AWS = str(REPO / "cluster" / "aws.yaml")
KUBERAY = str(REPO / "cluster" / "kuberay" / "raycluster.yaml")


def _types(path=AWS):
    return load_node_types(path)


def test_node_types_come_from_launcher_yaml_and_kuberay_alike():
    for path in (AWS, KUBERAY):
        by = {t.device: t for t in _types(path) if t.hosts_training}
        assert sorted(by) == ["A100-40GB", "H100-SXM", "L4"]
        assert (by["H100-SXM"].resources["GPU"], by["H100-SXM"].max_workers) == (8, 2)
        assert by["L4"].labels["distgpt.io/spot"] == "true"
    assert _types(AWS)[0].name == "head" and not _types(AWS)[0].hosts_training
    # KubeRay manifests are inventories too, the same cluster the launcher YAML describes
    assert load_inventory(KUBERAY).by_type() == {"H100-SXM": 16, "A100-40GB": 16, "L4": 16}


def test_a_rayjob_on_an_existing_cluster_points_at_its_raycluster():
    with pytest.raises(InventoryError, match="RayCluster manifest instead"):
        _types(str(REPO / "cluster" / "kuberay" / "rayjob.yaml"))


def test_groups_pack_onto_the_fewest_nodes_of_the_type_they_name():
    types = _types()
    plan = Plan(dp=4, tp=4, dp_engine="fsdp", replica_devices=("H100-SXM",) * 4)
    fitted = fit(group_specs(plan, kinds_of(types), 1.0), types)
    assert fitted.ok and fitted.nodes == {"h100": 2}  # 4 groups of 4 GPUs on 8-GPU nodes
    assert fitted.price_per_hour(types) == pytest.approx(2 * 98.32)
    # a heterogeneous pipeline needs one node of each type it names
    het = fit(group_specs(Plan(pp=2, stage_devices=("A100-40GB", "L4")), kinds_of(types), 1.0), types)
    assert het.nodes == {"a100": 1, "l4-spot": 1}


def test_what_cannot_fit_is_named_with_its_fix():
    types = _types()
    kinds = kinds_of(types)
    missing = fit(group_specs(Plan(pp=2, stage_devices=("A100-40GB", "H200")), kinds, 1.0), types)
    assert missing.problems == [f"ranks [1]: need a node with distgpt.io/device=H200 and 1 GPU per rank: no node "
                                f"type has it ({missing.problems[0].split('has it (')[1]}"]
    too_wide = fit(group_specs(Plan(dp=1, tp=4, dp_engine="fsdp"), kinds, 64.0), types)
    assert "needs 256 CPU, 4 GPU" in too_wide.problems[0] and "lower plan.tp or cluster.cpus_per_worker" \
        in too_wide.problems[0]
    too_many = fit(group_specs(Plan(dp=20, replica_devices=("H100-SXM",) * 20), kinds, 1.0), types)
    assert "h100 max_workers = 2" in too_many.problems[0] and "3 more group(s)" in too_many.problems[0]


def test_a_device_the_cluster_lacks_keeps_its_label():
    """Otherwise a group planned for H100s would run on whatever node is free."""
    specs = group_specs(Plan(dp=2, replica_devices=("L4", "H100-SXM")), {"L4": Kind(("x/dev", "l4"), True)}, 1.0)
    assert [s.selector for s in specs] == [{"x/dev": "l4"}, {"distgpt.io/device": "H100-SXM"}]


def test_cluster_check_says_what_the_autoscaler_will_start(capsys):
    assert main(["cluster", "check", AWS, "--job", str(REPO / "jobs" / "hetero.toml")]) == 0
    out = capsys.readouterr().out
    assert "plan (the planner's choice)" in out and "fits: the autoscaler will start" in out and "per hour" in out
    assert main(["cluster", "check", AWS, "--job", str(REPO / "jobs" / "gpt2-124m.toml"), "--plan.dp=64",
                 "--train.global_batch_size=512"]) == 3
    assert "does not fit: ranks" in capsys.readouterr().out


def test_cluster_check_takes_a_saved_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(Plan(dp=2, tp=8, dp_engine="fsdp", replica_devices=("A100-40GB",) * 2).to_json())
    assert main(["cluster", "check", KUBERAY, "--job", str(REPO / "jobs" / "gpt2-124m.toml"), "--plan",
                 str(plan), "--plan.dp=2"]) == 3  # tp=8 does not divide 12 heads
    assert "does not fit" in capsys.readouterr().out
    plan.write_text(json.dumps({**json.loads(plan.read_text()), "tp": 4}))
    assert main(["cluster", "check", KUBERAY, "--job", str(REPO / "jobs" / "gpt2-124m.toml"), "--plan",
                 str(plan)]) == 0
    assert "start 1× a100 (A100-40GB)" in capsys.readouterr().out  # both 4-GPU groups share one 8-GPU node


def test_plan_on_a_cluster_config_names_the_nodes_and_their_price(capsys):
    assert main(["plan", str(REPO / "jobs" / "hetero.toml"), "--inventory", AWS, "--top", "1"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "The autoscaler will start" in x]
    assert line and "per hour" in line[0]


def test_the_runs_node_types_resolve_from_the_setting(tmp_path, monkeypatch):
    from distgpt.config import load_job
    from distgpt.orchestrator.autoscale import UnplaceableError, node_types

    monkeypatch.setenv("HOME", str(tmp_path))
    assert node_types("none").path == "" and node_types("auto").path == ""  # no launcher bootstrap config here
    (tmp_path / "ray_bootstrap_config.yaml").write_text((REPO / "cluster" / "aws.yaml").read_text())
    assert node_types("auto").path == str(tmp_path / "ray_bootstrap_config.yaml")  # on a launched head
    types = node_types(KUBERAY)
    job = load_job(REPO / "jobs" / "gpt2-124m.toml")
    assert types.demand(job, Plan(dp=2, replica_devices=("L4", "L4"))) == "1× l4-spot (L4)"
    with pytest.raises(UnplaceableError, match="no node type in .*raycluster.yaml can host plan"):
        types.demand(job, Plan(dp=2, replica_devices=("L4", "V100")))
    with pytest.raises(InventoryError, match="no such cluster config"):
        node_types(str(tmp_path / "missing.yaml"))
