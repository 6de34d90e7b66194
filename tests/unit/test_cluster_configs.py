"""The cluster configs in ``cluster/``: every launcher YAML passes the schema Ray ships and Ray's own config
preparation, declares real resources and distgpt's labels, keeps the dashboard on the head's loopback with token
authentication on; the KubeRay manifests have what KubeRay requires; the planner reads each as an inventory."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from distgpt.config import load_job
from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import load_inventory

from ..conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml", "onprem.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_rays_schema_and_config_preparation(name):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # no unknown field, whole-number resources, node types with node_config
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in json.dumps(config)
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any("pip install" in c and "distgpt" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ubuntu/distgpt"] == "."  # this checkout, pinned


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_node_types_declare_resources_labels_and_spot(name):
    config = _load(name)
    assert config["idle_timeout_minutes"] > 0 and config["max_workers"] > 0
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["labels"]["distgpt.io/slots"] == "0" and head["max_workers"] == 0
    gpu_types = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert len(gpu_types) >= 3
    for nt in gpu_types.values():
        assert {"CPU", "GPU", "memory"} <= set(nt["resources"]) and nt["resources"]["GPU"] > 0
        assert device_type(nt["labels"]["distgpt.io/device"])  # a device the planner knows
        assert float(nt["labels"]["distgpt.io/price"]) > 0 and nt["min_workers"] == 0 and nt["max_workers"] > 0
    assert any(nt["labels"]["distgpt.io/spot"] == "true" for nt in gpu_types.values())


@pytest.mark.parametrize(("name", "devices"), [
    ("aws.yaml", {"H100-SXM": 16, "A100-40GB": 16, "L4": 16}),
    ("gcp.yaml", {"H100-SXM": 16, "A100-40GB": 16, "L4": 16}),
    ("onprem.yaml", {"V100": 16}),
])
def test_the_planner_reads_each_as_what_the_autoscaler_can_build(name, devices):
    inv = load_inventory(CLUSTER / name)
    assert inv.by_type() == devices
    spot = [g for g in inv.groups if g.spot]
    assert (name == "onprem.yaml") or (spot and all(g.price_per_hour > 0 for g in inv.groups))


def test_kuberay_raycluster_has_what_kuberay_requires():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1" and head["rayStartParams"]["num-gpus"] == "0"
    for c in [*head["template"]["spec"]["containers"]]:
        assert c["name"] and c["image"] and {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 3 and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and isinstance(g["rayStartParams"], dict)
        pod = g["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        (c,) = pod["containers"]
        assert c["name"] and c["image"] and int(c["resources"]["limits"]["nvidia.com/gpu"]) > 0
        labels = json.loads(g["rayStartParams"]["labels"])
        assert device_type(labels["distgpt.io/device"])


def test_kuberay_rayjob_runs_a_shipped_job_on_that_cluster():
    rj = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    assert rj["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "distgpt", "train"]
    job = load_job(REPO / argv[4], argv[5:])  # a job that exists and validates with these overrides
    assert job.checkpoint.uri.startswith("s3://") and job.data.prepared.startswith("s3://")
