"""``distgpt tune JOB``: measure Plans (or hyper-parameters) with Ray Tune; save the best Plan and a refitted profile.

Exit codes: 0 done, 1 every trial failed, 2 bad input, 130 interrupted (Ctrl-C; resume with ``--resume``).
"""

from __future__ import annotations

import argparse

from distgpt.cli import Command, job_argument
from distgpt.config_schema import ConfigError

INTERRUPTED = 130


def _faults(specs: list[str]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for spec in specs:
        n, sep, fault = spec.partition(":")
        if not sep or not n.isdigit() or int(n) < 1:
            raise ConfigError([f"--inject {spec!r}: write TRIAL:KIND@STEP[:RANK], e.g. 2:oom@3 (trial 2 runs out "
                               "of memory before step 4)"], "--inject")
        out.setdefault(int(n), []).append(fault)
    return {k: tuple(v) for k, v in out.items()}


def tune(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the tune; 130 if it was interrupted."""
    from distgpt.cli.train import read_plan
    from distgpt.config import load_job
    from distgpt.tune.runner import TuneOptions, tune_job

    job = load_job(args.job, overrides)
    out = args.out or f"runs/tune-{job.run.name}"
    opts = TuneOptions(out=out, trials=args.trials, steps=args.steps, goal=args.objective, space=args.space,
                       inventory=args.inventory or "", profile=args.profile or "", plan=read_plan(args.plan),
                       resume=args.resume, address=args.address or "", explore=args.explore,
                       grace_steps=args.grace_steps, concurrency=args.concurrency,
                       hang_timeout_s=args.hang_timeout_s, faults=_faults(args.inject))
    rep = tune_job(job, opts)
    return INTERRUPTED if rep.interrupted else 0


def _arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p)
    p.add_argument("--inventory", help="plan for this inventory / cluster config (default: the connected cluster)")
    p.add_argument("--trials", type=int, default=8, help="trials to run at most (default 8)")
    p.add_argument("--steps", type=int, default=20, help="training steps per trial (default 20)")
    p.add_argument("--objective", choices=["throughput", "cost"], default="throughput")
    p.add_argument("--space", choices=["plans", "hparams"], default="plans",
                   help="plans: the planner's runnable Plans; hparams: lr, warm-up, batch with one Plan")
    p.add_argument("--out", help="results: a directory or an object-store URI (default runs/tune-<run name>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted tune at --out")
    p.add_argument("--profile", help="hardware profile to rank plans with (the written profile builds on it)")
    p.add_argument("--plan", help="--space hparams: the Plan (JSON) to hold fixed")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded one)")
    p.add_argument("--explore", type=int, default=0,
                   help="trials spent on the predicted best of each plan family first (default: half)")
    p.add_argument("--grace-steps", type=int, default=0, help="ASHA's first rung (default: steps/4, at least 3)")
    p.add_argument("--concurrency", type=int, default=1, help="trials at once (default 1: trials share no cores)")
    p.add_argument("--hang-timeout-s", type=float, default=60.0, help="a trial with no step for this long failed")
    p.add_argument("--inject", action="append", default=[], metavar="TRIAL:FAULT",
                   help="fault drill for one trial, e.g. 2:oom@3 or 3:slow@1 (tests and drills)")


COMMANDS = [Command(("tune",), "measure plans or hyper-parameters with Ray Tune; save the best", tune, _arguments)]
