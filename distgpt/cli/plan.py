"""``distgpt plan JOB --inventory FILE``: rank plans, explain the best, save it. Imports no torch.

Exit codes: 0 a plan fits, 3 nothing fits (the output says why), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from distgpt.cli import Command, job_argument

NOTHING_FITS = 3


def plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print ranked plans; 0 if one fits, 3 if none does."""
    from distgpt.config import load_job
    from distgpt.planner.calibrate import device_models, load_profile
    from distgpt.planner.explain import explain, nothing_fits, table
    from distgpt.planner.inventory import load_inventory
    from distgpt.planner.search import Objective, search

    job = load_job(args.job, overrides)
    inv = load_inventory(args.inventory)
    devices = device_models(load_profile(args.profile)) if args.profile else {}
    w = job.workload()
    objective = Objective(args.objective, args.max_price_per_hour, args.min_tokens_per_s)
    t0 = time.perf_counter()
    res = search(w, inv, objective, devices, max(args.top, 50))  # the explanation compares with the runners-up
    shown = res.ranked[: args.top]
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"inventory": inv.summary(), "search_seconds": elapsed, "evaluated": res.evaluated,
                          "plans": [_as_json(c) for c in shown],
                          "nothing_fits": None if res.ranked else nothing_fits(res, inv, w)}, indent=2))
    else:
        print(f"{inv.summary()} | {w.model.n_layer}L d={w.model.n_embd} batch {w.global_batch}×{w.seq_len} "
              f"{w.dtype} | {res.evaluated} candidates in {elapsed:.2f}s"
              f"{' | measured profile' if devices else ' | catalog peaks (no profile)'}")
        if res.ranked:
            print(table(res, args.top) + "\n\n" + explain(res.ranked[0], inv, w, res.ranked[1:]))
            line = _autoscaler_demand(args.inventory, res.ranked[0].plan, job.cluster.cpus_per_worker)
            if line:
                print(line)
        else:
            print(nothing_fits(res, inv, w))
    if res.ranked and args.save:
        with open(args.save, "w") as f:
            f.write(res.ranked[0].plan.to_json())
    return 0 if res.ranked else NOTHING_FITS


def _autoscaler_demand(path: str, plan, cpus_per_worker: float) -> str:
    """For a cluster config (launcher YAML or RayCluster): the nodes of each type the plan makes the autoscaler
    start, and their price per hour ('' for a plain inventory file, which has no node types)."""
    from distgpt.planner.capacity import demand, fit, group_specs, kinds_of
    from distgpt.planner.inventory import InventoryError
    from distgpt.planner.node_types import load_node_types

    try:
        types = load_node_types(path)
    except InventoryError:
        return ""
    fitted = fit(group_specs(plan, kinds_of(types), cpus_per_worker), types)
    if not fitted.ok:
        return "- The autoscaler could not host it: " + "; ".join(fitted.problems)
    return f"- The autoscaler will start {demand(fitted, types)} (`distgpt cluster check {path} --job JOB`)."


def _as_json(c) -> dict:
    return {"plan": asdict(c.plan), "describe": c.plan.describe(), "step_time_s": c.step_time,
            "tokens_per_s": c.tokens_per_s, "mfu": c.mfu, "peak_memory_bytes": c.memory,
            "capacity_bytes": c.capacity, "price_per_hour": c.price_per_hour, "cost_per_mtok": c.cost_per_mtok,
            "breakdown_s": c.breakdown, "devices_used": c.devices_used, "bottleneck": c.bottleneck}


def _arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p)
    p.add_argument("--inventory", required=True, help="inventory file (TOML/YAML) or a Ray cluster-launcher YAML")
    p.add_argument("--objective", choices=["throughput", "cost"], default="throughput")
    p.add_argument("--max-price-per-hour", type=float, help="budget: plans above it are dropped")
    p.add_argument("--min-tokens-per-s", type=float, help="plans below it are dropped")
    p.add_argument("--profile", help="hardware profile from `distgpt bench hardware` (measured figures)")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--save", help="write the best Plan as JSON (for `distgpt train --plan`)")


COMMANDS = [Command(("plan",), "choose a parallel plan for a job on a (heterogeneous) cluster", plan, _arguments)]
