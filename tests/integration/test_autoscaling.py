"""Ray's autoscaler (v2) adding and removing nodes of the types a Plan asks for, on a sandbox head that starts with
zero worker nodes (``distgpt.orchestrator.sandbox``: Ray's fake multi-node provider, everything on 127.0.0.1, stopped
by process — never ``ray stop``). ``distgpt train`` runs as a user would run it, against the head's address, with
the autoscaling config as ``cluster.node_types``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distgpt.orchestrator.sandbox import AutoscalingSandbox

from ..conftest import REPO

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
NODE_TYPES = {
    "a100": {"resources": {"CPU": 2}, "max_workers": 2,
             "labels": {"distgpt.io/device": "A100-40GB", "distgpt.io/slots": "2"}},
    "l4": {"resources": {"CPU": 2}, "max_workers": 1,
           "labels": {"distgpt.io/device": "L4", "distgpt.io/slots": "2", "distgpt.io/price": "0.8"}},
}


TOKEN = "distgpt-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def sandbox():
    # Ray's token authentication on, as on a real cluster: every process here gets the token through its env
    with AutoscalingSandbox(NODE_TYPES, idle_timeout_s=5.0, auth_token=TOKEN) as sb:
        yield sb


def _distgpt(sb: AutoscalingSandbox, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
    env = {**sb.env(), "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS")
    return subprocess.run([str(Path(sys.executable).with_name("distgpt")), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_jobs_api_refuses_a_wrong_token_in_one_line_and_takes_the_right_one(sandbox):
    wrong = _distgpt(sandbox, "list", "--address", sandbox.jobs_address, token="not-the-token")
    assert wrong.returncode == 2, wrong.stderr
    assert "refused this client's token" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "not-the-token" not in wrong.stderr + wrong.stdout and TOKEN not in wrong.stderr + wrong.stdout
    right = _distgpt(sandbox, "list", "--address", sandbox.jobs_address)
    assert right.returncode == 0, right.stderr


def _train(sb: AutoscalingSandbox, tiny_data: str, out: Path, stages: str, timeout: float = 300):
    cmd = [str(Path(sys.executable).with_name("distgpt")), "train", str(REPO / "jobs" / "tiny.toml"),
           f"--data.prepared={tiny_data}", f"--run.out_dir={out}", "--train.max_steps=6", "--train.eval_interval=0",
           "--plan.pp=2", f"--plan.stage_devices={stages}", f"--cluster.node_types={sb.config_path}",
           "--cluster.start_timeout_s=600", "--checkpoint.interval=0"]
    return subprocess.run(cmd, env={**sb.env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def _launched(sb: AutoscalingSandbox, verb: str) -> list[str]:
    return [m.split("type ")[1].split()[0].rstrip(".") for _, m in sb.events() if m.startswith(verb)]


def test_a_plan_no_node_type_can_host_fails_at_once_with_the_reason(sandbox, tiny_data, tmp_path):
    # start_timeout_s is 600 s and the subprocess gets 120: only a refusal before reserving can end it in time
    r = _train(sandbox, tiny_data, tmp_path, "['A100-40GB', 'H100-SXM']", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no node type in" in r.stderr and "ranks [1]: need a node with distgpt.io/device=H100-SXM" in r.stderr
    assert _launched(sandbox, "Adding") == []  # nothing was requested, so nothing was started


def test_training_scales_up_from_zero_nodes_and_idle_nodes_go(sandbox, tiny_data, tmp_path):
    assert _launched(sandbox, "Adding") == []  # zero worker nodes before the run
    r = _train(sandbox, tiny_data, tmp_path, "['A100-40GB', 'L4']")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cluster: no worker node up yet; the autoscaler can grow it to 4× A100-40GB" in r.stdout
    assert "autoscaler: the plan needs 1× a100 (A100-40GB), 1× l4 (L4, 0.8/h each) = 0.80 per hour" in r.stdout
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps if "loss" in s) == 6
    assert sorted(_launched(sandbox, "Adding")) == ["a100", "l4"]  # one node of each type the stages named
    deadline = time.monotonic() + 120
    while sorted(_launched(sandbox, "Removing")) != ["a100", "l4"] and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(_launched(sandbox, "Removing")) == ["a100", "l4"], sandbox.events()
