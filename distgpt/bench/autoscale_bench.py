"""``distgpt bench autoscale``: the Ray-user path on a real autoscaler (``orchestrator.sandbox``, token auth on), each
figure beside a reference measured in the same run, alternated.

1. Submission: ``distgpt submit`` vs ``ray job submit`` of the very same entrypoint and runtime_env — seconds from
   the command to the first completed training step (rank 0's wall-clock stamp in metrics.jsonl).
2. Scale-up: from a placement-group request whose label no node has yet to the group being ready (the autoscaler
   starts a node), vs the same request on a type that is already up; and how long an idle node takes to go.
3. Re-plan on growth: a run with ``cluster.grow = "replan"``; the autoscaler is asked for an H100 node mid-run
   (``request_resources``); seconds from the re-plan to the first step on the new Plan, vs a restart after a killed
   rank (``kill@``) of the same job — both restart every worker from a checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distgpt.orchestrator.sandbox import AutoscalingSandbox

TYPES = {
    "warm": {"resources": {"CPU": 4}, "min_workers": 1, "max_workers": 1,
             "labels": {"distgpt.io/device": "L4", "distgpt.io/slots": "2"}},
    "cold": {"resources": {"CPU": 2}, "max_workers": 1, "labels": {"distgpt.io/device": "A100-40GB",
                                                                    "distgpt.io/slots": "2"}},
    "h100": {"resources": {"CPU": 2}, "max_workers": 1, "labels": {"distgpt.io/device": "H100-SXM",
                                                                    "distgpt.io/slots": "2"}},
}
TRAIN = ["--train.log_interval=1", "--train.eval_interval=0", "--sample.max_new_tokens=1", "--model.n_embd=64",
         "--train.global_batch_size=32", "--checkpoint.async_save=false", "--cluster.node_types=none"]


def _records(out: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    except FileNotFoundError:
        return []


def _first_step(out: Path, jobs, job_id: str, timeout_s: float = 300) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [r["time"] for r in _records(out) if r.get("kind") is None and "loss" in r]
        if steps:
            return steps[0]
        if str(jobs.get_job_status(job_id)).split(".")[-1] in ("FAILED", "STOPPED"):
            break
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} completed no step: {jobs.get_job_logs(job_id)[-3000:]}")


def _wait_job(jobs, job_id: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(jobs.get_job_status(job_id))
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    jobs.stop_job(job_id)
    return "TIMEOUT"


def _submissions(sb: AutoscalingSandbox, job: str, train: list[str], work: Path,
                 repeats: int) -> tuple[list[float], list[float]]:
    """Alternate ``distgpt submit`` and ``ray job submit`` of the same entrypoint and runtime_env (working_dir,
    excludes, env_vars); seconds from starting the command to the job's first completed step."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(sb.jobs_address)
    bin_dir = Path(sys.executable).parent
    ship = Path(job).parent  # only the job file travels; outputs go beside it, not into the package
    ours, ref = [], []
    for i in range(-1, repeats):  # round -1 warms the cluster's job manager and runtime-env agent; not counted
        for who, times in (("distgpt", ours), ("ray", ref)):
            out = work / f"submit-{who}-{i}"
            over = [*train, "--train.max_steps=3", f"--run.out_dir={out}"]
            t0 = time.time()
            if who == "distgpt":
                r = subprocess.run([str(bin_dir / "distgpt"), "submit", job, "--address", sb.jobs_address,
                                    "--allow-local", "--working-dir", str(ship), "--python", sys.executable, *over],
                                   env=sb.env(), capture_output=True, text=True, check=True)
                job_id = r.stdout.split("submitted ")[1].split()[0]
            else:
                entry = [sys.executable, "-m", "distgpt", "train", os.path.basename(job), *over]
                env_vars = json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                                       "excludes": ["runs/", "data/", ".venv/"]})
                r = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", sb.jobs_address, "--no-wait",
                                    "--working-dir", str(ship), "--runtime-env-json", env_vars, "--", *entry],
                                   env=sb.env(), capture_output=True, text=True, check=True)
                job_id = r.stdout.split("Job '")[1].split("'")[0]
            first = _first_step(out, jobs, job_id) - t0
            _wait_job(jobs, job_id)
            if i >= 0:
                times.append(first)
    return ours, ref


def _scale_ups(sb: AutoscalingSandbox, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """(cold placement s, warm placement s, idle removal s) per repeat, alternated."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cold, warm, idle = [], [], []
    for _ in range(repeats):
        for label, times in (("A100-40GB", cold), ("L4", warm)):
            removed = sum(m.startswith("Removing") for _, m in sb.events())
            t0 = time.monotonic()
            pg = placement_group([{"CPU": 1}], strategy="STRICT_PACK",
                                 bundle_label_selector=[{"distgpt.io/device": label}])
            ray.get(pg.ready(), timeout=300)
            times.append(time.monotonic() - t0)
            remove_placement_group(pg)
            if label == "A100-40GB":
                t1 = time.monotonic()
                while sum(m.startswith("Removing") for _, m in sb.events()) == removed:
                    time.sleep(0.2)
                idle.append(time.monotonic() - t1)
    return cold, warm, idle


def _growth_and_restart(sb: AutoscalingSandbox, job: str, train: list[str], work: Path) -> tuple[dict, dict]:
    """One growth re-plan and one kill@ restart of the same job; their metrics records."""
    from ray.autoscaler.sdk import request_resources

    bin_dir = Path(sys.executable).parent
    base = [str(bin_dir / "distgpt"), "train", job, *train, "--cluster.plan=auto", "--checkpoint.interval=20"]
    grow_out = work / "grow"
    p = subprocess.Popen([*base, "--train.max_steps=300", "--cluster.grow=replan", "--cluster.grow_check_s=0.5",
                          f"--run.out_dir={grow_out}"], env=sb.env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while len([r for r in _records(grow_out) if "loss" in r]) < 10 and p.poll() is None:
        time.sleep(0.2)
    request_resources(bundles=[{"CPU": 2}], bundle_label_selectors=[{"distgpt.io/device": "H100-SXM"}])
    p.wait(timeout=600)
    request_resources(bundles=[])  # let the node go idle again
    kill_out = work / "kill"
    subprocess.run([*base, "--train.max_steps=60", "--cluster.inject=['kill@30:0']", f"--run.out_dir={kill_out}"],
                   env=sb.env(), capture_output=True, check=True, timeout=600)
    grew = next((r for r in _records(grow_out) if r.get("kind") == "growth" and r["stage"] == "measured"), {})
    resumed = next((r for r in _records(kill_out) if r.get("kind") == "resumed"), {})
    return grew, resumed


def _spread(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def run(job_path: str, overrides: list[str], repeats: int = 2) -> int:
    """Print the three comparisons; return 0."""
    work = Path(tempfile.mkdtemp(prefix="dg-bench-as-"))
    (work / "ship").mkdir()
    job = str(work / "ship" / Path(job_path).name)
    Path(job).write_text(Path(job_path).read_text())
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared

    ensure_prepared(load_job(job, [*overrides, f"--data.prepared={work / 'data'}"]))
    train = [*TRAIN, f"--data.prepared={work / 'data'}", *overrides]
    with AutoscalingSandbox(TYPES, idle_timeout_s=5.0, auth_token=secrets.token_hex(16)) as sb:
        os.environ.update({k: v for k, v in sb.env().items() if k.startswith("RAY_") and k != "RAY_ADDRESS"})
        import ray

        ray.init(address=sb.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            ours, ref = _submissions(sb, job, train, work, repeats)
            print(f"submit → first step: distgpt submit {statistics.median(ours):.1f} s, ray job submit "
                  f"{statistics.median(ref):.1f} s → ratio {statistics.median(ours) / statistics.median(ref):.2f}"
                  f"   [runs: {_spread(ours)} / {_spread(ref)}]")
            cold, warm, idle = _scale_ups(sb, repeats + 1)
            print(f"scale-up: placement needing a new node {statistics.median(cold):.1f} s (autoscaler starts it) "
                  f"vs on a node already up {statistics.median(warm):.2f} s; idle node removed after "
                  f"{statistics.median(idle):.1f} s (idle_timeout 5 s)   [runs: {_spread(cold)}]")
            grew, resumed = _growth_and_restart(sb, job, train, work)
            if grew:
                print(f"re-plan on growth: {grew['plan_before']} → {grew['plan_after']}, first step "
                      f"{grew['replan_s']:.1f} s after the re-plan ({grew['tokens_per_s_before']:,.0f} → "
                      f"{grew['tokens_per_s_after']:,.0f} tokens/s) vs restart after a killed rank "
                      f"{resumed.get('recovery_s', float('nan')):.1f} s (failure → next step)")
            else:
                print("re-plan on growth: the run ended before the H100 node joined (raise --train.max_steps)")
        finally:
            ray.shutdown()
    return 0
