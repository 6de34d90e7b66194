"""``distgpt plan``: load job + inventory (+ profile), search, print the table and the explanation (or JSON)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from distgpt.config import load_job
from distgpt.planner.calibrate import device_models, load_profile
from distgpt.planner.cost import Workload
from distgpt.planner.explain import explain, nothing_fits, table
from distgpt.planner.inventory import InventoryError, load_inventory
from distgpt.planner.search import Objective, search

NOTHING_FITS = 3


def plan_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print ranked plans; 0 if one fits, 3 if none does, 2 on bad input."""
    import time

    job = load_job(args.job, overrides)
    try:
        inv = load_inventory(args.inventory)
        devices = device_models(load_profile(args.profile)) if args.profile else {}
    except (InventoryError, ValueError, KeyError) as e:
        print(f"distgpt: error: {e}", file=__import__("sys").stderr)
        return 2
    vocab = job.model.vocab_size or (257 if job.data.tokenizer == "byte" else job.data.vocab_size)
    w = Workload(job.gpt_config(vocab), job.train.global_batch_size, job.seq_len,
                 "bf16" if job.train.dtype == "bf16" else "fp32")
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
        else:
            print(nothing_fits(res, inv, w))
    if res.ranked and args.save:
        with open(args.save, "w") as f:
            f.write(res.ranked[0].plan.to_json())
    return 0 if res.ranked else NOTHING_FITS


def _as_json(c) -> dict:
    return {"plan": asdict(c.plan), "describe": c.plan.describe(), "step_time_s": c.step_time,
            "tokens_per_s": c.tokens_per_s, "mfu": c.mfu, "peak_memory_bytes": c.memory,
            "capacity_bytes": c.capacity, "price_per_hour": c.price_per_hour, "cost_per_mtok": c.cost_per_mtok,
            "breakdown_s": c.breakdown, "devices_used": c.devices_used, "bottleneck": c.bottleneck}
