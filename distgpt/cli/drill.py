"""``distgpt drill storage JOB``: make the job's checkpoint store fail on purpose and check that nothing is lost."""

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


COMMANDS = [Command(("drill", "storage"), "fail the checkpoint store on purpose (503s, resets, an outage) while a "
                    "short run saves and resumes; checks nothing is lost", storage_drill, _arguments,
                    group_help="failure drills")]
