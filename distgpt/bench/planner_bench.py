"""Planner benchmarks.

``distgpt bench planner``: planning time for synthetic clusters of 4 device types (1,024 and 16,384 devices), on one
core, for a 13B model — the figure to compare with published planners.

``distgpt bench plan-accuracy --profile P``: run the planner's candidate plans for real on this machine (torchrun,
gloo, one rank per core) and compare predicted with measured step time and peak memory per rank; also whether the
planner's top plan is within 5% of the best measured one.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from distgpt.model.presets import preset
from distgpt.planner.cost import Workload
from distgpt.planner.inventory import inventory_from_dict
from distgpt.planner.search import search

TYPES = (("H100-SXM", "aws", 400), ("A100-80GB", "aws", 100), ("L40S", "gcp", 50), ("V100", "onprem", 12.5))


def synthetic(devices: int):
    per = devices // len(TYPES) // 8
    return inventory_from_dict({"inter_site_gbps": 1.25, "nodes": [
        {"name": t, "device": t, "count": 8, "replicas": per, "site": site, "network_gbps": net,
         "price_per_hour": 10.0} for t, site, net in TYPES]})


def run_planning_time() -> int:
    """Print planning time per cluster size (best of 3)."""
    w = Workload(preset("13b"), 4096, 2048, "bf16")
    print("planning time, 13B model, global batch 4096×2048, 4 device types (H100, A100-80GB, L40S, V100):")
    for n in (64, 1024, 16384):
        inv = synthetic(n)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = search(w, inv)
            times.append(time.perf_counter() - t0)
        top = res.ranked[0]
        print(f"  {inv.total_devices:>6} devices: {min(times):.2f} s ({res.evaluated} candidates) → "
              f"{top.plan.describe()[:70]} | {top.tokens_per_s:,.0f} tok/s, uses {top.devices_used}")
    return 0


def run_accuracy(job: str, overrides: list[str], profile: str, steps: int, n_plans: int) -> int:
    """Predicted vs measured, for the planner's top plans on this machine's cores."""
    from distgpt.bench.parallel_bench import launch
    from distgpt.config import load_job
    from distgpt.planner.calibrate import device_models, load_profile
    from distgpt.trainer import ensure_prepared

    job_cfg = load_job(job, overrides)
    manifest = ensure_prepared(job_cfg)
    cores = os.cpu_count() or 1
    inv = inventory_from_dict({"nodes": [{"name": "this-machine", "device": "cpu", "count": cores}]})
    w = Workload(job_cfg.gpt_config(manifest["tokenizer"]["vocab_size"]), job_cfg.train.global_batch_size,
                 job_cfg.seq_len, "fp32")
    devices = device_models(load_profile(profile))
    ranked = [c for c in search(w, inv, devices=devices, top=50).ranked if c.plan.world_size == cores][:n_plans]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in ranked:
            p = c.plan
            extra = [f"--plan.dp={p.dp}", f"--plan.tp={p.tp}", f"--plan.pp={p.pp}", f"--plan.dp_engine='{p.dp_engine}'",
                     f"--plan.zero_stage={p.zero_stage}", f"--plan.micro_batch_size={p.micro_batch_size}",
                     f"--plan.recompute={str(p.recompute).lower()}", f"--plan.stage_layers={list(p.stage_layers)}",
                     "--train.progress=false", "--train.tensorboard=false", *overrides]
            got = launch(p.world_size, job, extra, steps, False, tmp)
            if "error" in got:
                print(f"  {p.describe()}: FAILED {got['error'][:100]}")
                continue
            tokens = w.global_batch * w.seq_len
            rows.append((c, tokens / got["tokens_per_s"], got["peak_mb"] * 2**20))
    print(f"\n{'plan':48} {'pred s':>8} {'meas s':>8} {'err':>6} {'pred MB':>8} {'meas MB':>8} {'err':>6}")
    terr, merr = [], []
    for c, t, mem in rows:
        pm = max(c.memory.values())
        terr.append(abs(c.step_time - t) / t)
        merr.append(abs(pm - mem) / mem)
        print(f"{c.plan.describe()[:48]:48} {c.step_time:8.3f} {t:8.3f} {terr[-1]:6.1%} {pm / 2**20:8.0f} "
              f"{mem / 2**20:8.0f} {merr[-1]:6.1%}")
    if rows:
        best = min(t for _, t, _ in rows)
        print(f"step time error: mean {statistics.mean(terr):.1%}, worst {max(terr):.1%} (goal < 8%)")
        print(f"peak memory error: mean {statistics.mean(merr):.1%}, worst {max(merr):.1%} (goal < 6%)")
        print(f"planner's top plan measured {rows[0][1]:.3f} s vs best measured {best:.3f} s: "
              f"{rows[0][1] / best - 1:+.1%} (goal within 5%)")
    return 0 if rows else 1
