"""``distgpt cluster check CONFIG --job JOB``: will the autoscaler be able to host this job? Imports no torch, no Ray.

It takes the job's Plan (``--plan FILE``, the job's [plan], or with ``cluster.plan = "auto"`` the planner's best plan
for the cluster the config can grow to — about a second of search for 48 GPUs), turns it into the placement groups
the orchestrator would request, and packs them onto the config's node types: either the nodes it will need and their
price per hour (exit 0), or why no node type can host some group (exit 3) — instead of a placement group that pends
forever. Without the search it answers in a few hundredths of a second.
"""

from __future__ import annotations

import argparse
import time

from distgpt.cli import Command

DOES_NOT_FIT = 3


def check(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the verdict; 0 when every placement group fits some node type, 3 when one does not."""
    from distgpt.config import load_job
    from distgpt.planner.capacity import demand, fit, group_specs, kinds_of
    from distgpt.planner.inventory import load_inventory
    from distgpt.planner.node_types import load_node_types

    t0 = time.perf_counter()
    types = load_node_types(args.config)
    job = load_job(args.job, overrides)
    plan, how = job.plan, "the job's [plan]"
    if args.plan:
        from distgpt.cli.train import read_plan

        plan, how = read_plan(args.plan), args.plan
    elif job.cluster.plan == "auto":
        plan, how = _auto_plan(job, load_inventory(args.config)), "the planner's choice"
        if plan is None:
            return DOES_NOT_FIT
    problems = plan.problems(job.workload().model, None, job.train.global_batch_size)
    specs = group_specs(plan, kinds_of(types), job.cluster.cpus_per_worker)
    fitted = fit(specs, types)
    print(f"plan ({how}): {plan.describe()} — {len(specs)} placement group(s) of "
          f"{', '.join(sorted({f'{len(s.ranks)}× {s.bundle}' for s in specs}))}")
    for p in problems + fitted.problems:
        print(f"  does not fit: {p}")
    if not problems and fitted.ok:
        print(f"fits: the autoscaler will start {demand(fitted, types)}")
        if any(s.device is None for s in specs):
            print("  (the plan names no device type and the config has several: the autoscaler picks the type; "
                  "the cheapest is shown — `cluster.plan = \"auto\"` plans per type)")
    print(f"({time.perf_counter() - t0:.2f} s)")
    return 0 if not problems and fitted.ok else DOES_NOT_FIT


def _auto_plan(job, inv):
    from distgpt.planner.explain import nothing_fits
    from distgpt.planner.search import search

    w = job.workload()
    res = search(w, inv, top=1)
    if not res.ranked:
        print(f"does not fit: {nothing_fits(res, inv, w)}")
        return None
    return res.ranked[0].plan


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="Ray cluster-launcher YAML or KubeRay RayCluster manifest")
    p.add_argument("--job", required=True, help="job file (TOML or YAML)")
    p.add_argument("--plan", help="a Plan JSON (`distgpt plan --save`) instead of the job's own or the planner's")


COMMANDS = [Command(("cluster", "check"), "will the cluster's node types host this job's placement groups?",
                    check, _arguments, group_help="autoscaling cluster configs")]
