"""``distgpt drill storage JOB`` and ``distgpt drill chaos JOB``: fail on purpose, check that nothing is lost."""

from __future__ import annotations

import argparse

from distgpt.cli import Command, job_argument


def storage_drill(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run both acts of the storage drill (``recovery/storage_drill.py``) and print a summary."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.recovery.storage_drill import check, run_storage_drill

    job = load_job(args.job, overrides)
    ensure_prepared(job)
    acts = run_storage_drill(job, fault=args.fault)
    for a in acts:
        print(f"{'ok    ' if a.ok else 'FAILED'} {a.name:22} {a.seconds:6.1f} s  {a.detail}")
    check(acts)
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p, "jobs/tiny.toml")
    p.add_argument("--fault", choices=("error", "reset", "down"), default="error",
                   help="what the store does during the first act's failing save (default: answers 503)")


def chaos_drill(args: argparse.Namespace, overrides: list[str]) -> int:
    """A run with random faults against the same run without (``orchestrator/chaos.py``), on Ray."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.errors import RunFailed
    from distgpt.orchestrator.chaos import run_chaos
    from distgpt.orchestrator.driver import connect

    job = load_job(args.job, overrides)
    ensure_prepared(job)
    print(f"ray: {connect(args.address or job.cluster.address, job.cluster.embedded_cpus)}")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    report = run_chaos(job, args.faults, args.seed, kinds=kinds)
    print("\n".join(report.lines()))
    if not report.ok:
        raise RunFailed("chaos drill: the run with faults did not end where the run without them did")
    return 0


def _chaos_arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p, "jobs/tiny.toml")
    p.add_argument("--faults", type=int, default=10, help="how many faults (default 10)")
    p.add_argument("--seed", type=int, default=0, help="draws the faults' steps, ranks and kinds")
    p.add_argument("--address", default="", help="Ray cluster (default: $RAY_ADDRESS, else an embedded one)")
    p.add_argument("--kinds", default="kill,hang,preempt",
                   help="faults to draw from: kill, hang, preempt, remove (default kill,hang,preempt). 'remove' "
                        "SIGKILLs a worker node's raylet — the node leaves the Ray cluster until it is started again "
                        "(an autoscaler replaces it); never the driver's node")


COMMANDS = [Command(("drill", "storage"), "fail the checkpoint store on purpose (503s, resets, an outage) while a "
                    "short run saves and resumes; checks nothing is lost", storage_drill, _arguments,
                    group_help="failure drills"),
            Command(("drill", "chaos"), "a run with random kills, hangs, a preemption (and, asked for, a node "
                    "removal) against the same run without: equal parameters, losses and samples", chaos_drill,
                    _chaos_arguments)]
