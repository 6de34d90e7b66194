"""distgpt on a simulated multi-node Ray cluster (loopback, CPU, gloo): placement, failures, recovery, exactness.

Every run is the real path a user takes — ``run_on_ray(job)``: a Controller actor, one TrainWorker actor per rank in
placement groups, torch.distributed across the actors, checkpoints, recovery.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import ray

from distgpt.checkpoint.manager import CheckpointManager
from distgpt.cli import main
from distgpt.orchestrator.chaos import step_records as records
from distgpt.orchestrator.driver import OrchestrationError, run_on_ray
from distgpt.planner.plan import Plan

from ..conftest import REPO, moto_s3, tiny_job

pytestmark = pytest.mark.timeout(600)
BASE = ["--train.log_interval=1", "--train.eval_interval=0", "--train.eval_batches=1", "--model.dropout=0.0",
        "--sample.max_new_tokens=1", "--checkpoint.async_save=false", "--cluster.start_timeout_s=60"]


def train(tiny_data: str, out: Path, *overrides: str) -> dict:
    job = tiny_job(tiny_data, str(out), *BASE, *overrides)
    return run_on_ray(job, log=lambda s: None)


def test_placement_follows_the_plan(ray_cluster, tiny_data, tmp_path):
    s = train(tiny_data, tmp_path, "--train.max_steps=3", "--plan.pp=2", "--plan.stage_devices=['A100-40GB', 'L4']")
    nodes = {int(r): n for r, n in s["placements"][0]["nodes"].items()}
    assert nodes == {0: ray_cluster.nodes["a100"].node_id, 1: ray_cluster.nodes["l4"].node_id}
    assert s["state"] == "finished" and s["result"]["steps"] == 3


def test_chaos_drill_kills_hangs_a_preemption_and_a_node_removal_finish_equal(ray_cluster, tiny_data, tmp_path,
                                                                             capsys):
    """`distgpt drill chaos --kinds kill,hang,preempt,remove` on three nodes: two kills, a hang, a preemption and a
    node that dies without notice (its raylet SIGKILLed), at drawn steps and ranks. Up to the preemption every step's
    loss is bitwise equal to the same run without faults; the preemption and the removal each re-plan without their
    node, and the run ends equal within the parity tolerance, with the same samples at every step (none skipped or
    repeated); the report names each fault, recovery and the time it cost."""
    from .ray_cluster import NODES

    spare = ray_cluster.add(2, {"distgpt.io/device": "L4", "distgpt.io/site": "cloud", "distgpt.io/price": "0.8"})
    args = ["drill", "chaos", str(REPO / "jobs" / "tiny.toml"), "--faults=5", "--seed=37",
            "--kinds=kill,hang,preempt,remove", f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}", *BASE,
            "--train.max_steps=18", "--plan.dp=2", "--plan.replica_devices=['A100-40GB', 'A100-40GB']",
            "--checkpoint.interval=3", "--cluster.hang_timeout_s=8"]  # > the ~6 s Ray takes to call a node dead
    try:
        assert main(args) == 0
    finally:  # the removed node is gone for good: put one like it back for the tests after this one
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for name, node in list(ray_cluster.nodes.items()):
            if node.node_id not in alive:
                ray_cluster.cluster.remove_node(node, allow_graceful=False)
                ray_cluster.nodes[name] = ray_cluster.add(**NODES[name])
        ray_cluster.cluster.remove_node(spare, allow_graceful=spare.node_id in alive)
    out = capsys.readouterr().out
    assert "faults: kill@2:1, hang@3:1, kill@6:1, preempt@8:0, remove@11:1" in out
    causes = re.findall(r"recovery: (worker died|hang|preempted|node lost) at step \d+ → (restart|replan); [\d.]+ s "
                        r"to the next step", out)
    assert causes == [("worker died", "restart"), ("hang", "restart"), ("worker died", "restart"),
                      ("preempted", "replan"), ("node lost", "replan")]
    for what in ("final parameters", "loss at every step"):
        assert f"{what}: equal within rtol 0.0001, atol 1e-06 (re-planned) to the run without faults" in out
    assert "samples at every step: bitwise equal to the run without faults" in out
    ref, hurt = records(tmp_path / "chaos-reference"), records(tmp_path / "chaos-chaos")
    assert [hurt[i]["loss"] for i in range(1, 9)] == [ref[i]["loss"] for i in range(1, 9)]  # same Plan: bitwise
    assert '"kind": "resumed"' in (tmp_path / "chaos-chaos" / "metrics.jsonl").read_text()


def _steps_so_far(out: Path) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [r["step"] for r in map(json.loads, lines[:-1]) if r.get("kind") is None and "loss" in r]


def test_nodes_that_join_are_used_after_a_growth_replan(ray_cluster, tiny_data, tmp_path):
    """The other direction: a node joins mid-run (an operator or the autoscaler adding it); with cluster.grow =
    'replan' the controller checkpoints, re-plans onto the grown cluster, resumes there (DDP dp2 on L4 ×2, then on the
    H100 node's two slots: the planner's choices for this model) and logs tokens/s before and after."""
    out: dict = {}
    args = ["--train.max_steps=150", "--model.n_embd=64", "--train.global_batch_size=32", "--cluster.plan=auto",
            "--cluster.grow=replan", "--cluster.grow_check_s=0.5", "--checkpoint.interval=1000"]
    runner = threading.Thread(target=lambda: out.setdefault("s", train(tiny_data, tmp_path, *args)))
    runner.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_steps_so_far(tmp_path)) < 5:  # running, with tokens/s to compare
        time.sleep(0.2)
    h100 = ray_cluster.add(2, {"distgpt.io/device": "H100-SXM", "distgpt.io/site": "onprem"})
    try:
        runner.join(timeout=400)
    finally:
        ray_cluster.cluster.remove_node(h100)
    s = out["s"]
    assert s["state"] == "finished" and not s["recoveries"]  # growth is not a failure
    first, last = (Plan.from_json(p["plan"]) for p in (s["placements"][0], s["placements"][-1]))
    assert (first.dp, first.replica_devices, last.dp, last.replica_devices) == (2, ("L4",) * 2, 2, ("H100-SXM",) * 2)
    assert set(s["placements"][-1]["nodes"].values()) == {h100.node_id}
    (grew,) = [g for g in s["growths"] if g["stage"] == "measured"]
    assert grew["tokens_per_s_before"] > 0 and grew["tokens_per_s_after"] > 0 and "H100-SXM ×2" in grew["detail"]
    recs = records(tmp_path)
    assert sorted(recs) == list(range(1, 151))  # every step once, across the re-plan
    assert [recs[i]["samples"][0] for i in range(1, 151)] == [32 * i for i in range(150)]
    kinds = [json.loads(x).get("kind") for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "growth" in kinds


def test_preemption_checkpoints_then_replans_without_the_node(ray_cluster, tiny_data, tmp_path):
    s = train(tiny_data, tmp_path, "--train.max_steps=10", "--plan.dp=2",
              "--plan.replica_devices=['L4', 'L4']", "--checkpoint.interval=100", "--cluster.inject=['preempt@3:1']")
    (rec,) = s["recoveries"]
    assert rec["cause"] == "preempted" and rec["decision"] == "replan"
    l4 = ray_cluster.nodes["l4"].node_id
    assert set(s["placements"][0]["nodes"].values()) == {l4}
    assert l4 not in set(s["placements"][1]["nodes"].values())
    assert s["result"]["steps"] == 10
    # the preemption checkpoint (not an interval one) is what the new plan resumed from
    assert (tmp_path / "checkpoints" / f"step-{rec['step']:08d}").exists()


def test_a_hang_is_caught_by_the_watchdog(ray_cluster, tiny_data, tmp_path):
    s = train(tiny_data, tmp_path, "--train.max_steps=8", "--plan.dp=2", "--checkpoint.interval=2",
              "--cluster.hang_timeout_s=4", "--cluster.inject=['hang@3:1']")
    (rec,) = s["recoveries"]
    assert rec["cause"] == "hang" and "watchdog" in rec["detail"] and rec["decision"] == "restart"
    assert s["result"]["steps"] == 8


def test_cli_trains_on_the_connected_cluster_and_samples(ray_cluster, tiny_data, tmp_path, capsys, monkeypatch):
    """…with a checkpoint URI carrying a fake key and secret: the job the actors get holds no credential (they travel
    as runtime_env variables — the workers, started before these were in any environment, still reach the bucket)."""
    from distgpt.orchestrator import driver

    seen = []
    real = driver.split_credentials
    monkeypatch.setattr(driver, "split_credentials", lambda job: seen.append(real(job)) or seen[-1])
    secret = "FAKEsecret0123"
    with moto_s3("raycreds") as (port, _):
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(k)  # only the URI has credentials
        root = f"s3://AKIAFAKE:{secret}@raycreds/ck?endpoint_override=127.0.0.1:{port}&scheme=http"
        args = ["train", str(REPO / "jobs" / "tiny.toml"), f"--data.prepared={tiny_data}",
                f"--run.out_dir={tmp_path}", *BASE, "--train.max_steps=2", "--plan.dp=2",
                f"--checkpoint.uri={root}", "--checkpoint.interval=2"]
        here = os.getcwd()
        assert main(args) == 0
        assert os.getcwd() == here  # the driver waits elsewhere (train._load_for_after_the_run), then returns
        assert ray.is_initialized()  # train's release() stops only a cluster it started, not the one it joined
        committed = CheckpointManager(root).committed()
    out = capsys.readouterr()
    assert "trained 2 steps on Ray" in out.out and "--- sample" in out.out
    assert (tmp_path / "final" / "model.safetensors").exists()
    (job, env), = seen
    assert secret not in repr(job) and job.checkpoint.uri.startswith("s3://raycreds/ck?")
    assert env == {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": secret}
    assert [c.step for c in committed] == [2]  # the workers wrote it with the credentials from runtime_env
    assert secret not in out.out + out.err
    # the controller streamed rank 0's metrics to the driver, which wrote them
    recs = records(tmp_path)
    assert sorted(recs) == [1, 2] and all(r["tokens_per_s"] > 0 and r["mem_gb"] > 0.01 for r in recs.values())


def test_not_enough_resources_says_what_is_missing_within_the_timeout(ray_cluster, tiny_data, tmp_path, capsys):
    t0 = time.monotonic()
    args = ["train", str(REPO / "jobs" / "tiny.toml"), f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}",
            *BASE, "--plan.dp=8", "--train.global_batch_size=8", "--plan.micro_batch_size=1",
            "--cluster.start_timeout_s=3"]
    here = os.getcwd()
    assert main(args) == 1
    assert os.getcwd() == here
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert re.search(r"needs 8 slots, the cluster has \d+", err) and "fix:" in err
    with pytest.raises(OrchestrationError):  # the same through the API
        train(tiny_data, tmp_path, "--plan.dp=8", "--train.global_batch_size=8", "--plan.micro_batch_size=1",
              "--cluster.start_timeout_s=1")
