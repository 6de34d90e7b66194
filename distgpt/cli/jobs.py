"""``distgpt submit JOB``, ``status [ID]``, ``logs ID [--follow]``, ``stop ID``, ``list``: training as Ray jobs."""

from __future__ import annotations

import argparse
import sys
import time

from distgpt.cli import Command, job_argument


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="", help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_ADDRESS)")


def submit(args: argparse.Namespace, overrides: list[str]) -> int:
    """Validate the job for a cluster, submit it, say how to follow it."""
    from distgpt.orchestrator.jobs import submit as submit_job

    job_id = submit_job(args.job, overrides, args.address, args.allow_local, args.working_dir, args.python)
    print(f"submitted {job_id}\n  follow: distgpt logs {job_id} --follow\n  status: distgpt status {job_id}\n"
          f"  stop:   distgpt stop {job_id}")
    return 0


def status(args: argparse.Namespace, overrides: list[str]) -> int:
    """One job's status (or every job's, without an id)."""
    from distgpt.orchestrator.jobs import status as job_status

    if not args.job_id:
        return list_(args, overrides)
    r = job_status(args.address, args.job_id)
    print(f"{r.job_id}: {r.status}{f' — {r.message}' if r.message else ''}")
    return 0


def logs(args: argparse.Namespace, overrides: list[str]) -> int:
    """The job's output; with --follow, until it ends (exit 0 only if it succeeded)."""
    from distgpt.orchestrator.jobs import logs as job_logs

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    final = job_logs(args.address, args.job_id, args.follow, write)
    if args.follow:
        print(f"\n{args.job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    return 0


def stop(args: argparse.Namespace, overrides: list[str]) -> int:
    """Stop a job (its driver, and with it the run's workers and placement groups)."""
    from distgpt.orchestrator.jobs import TERMINAL
    from distgpt.orchestrator.jobs import status as job_status
    from distgpt.orchestrator.jobs import stop as stop_job

    if not stop_job(args.address, args.job_id):
        print(f"{args.job_id} had already ended ({job_status(args.address, args.job_id).status})")
        return 0
    deadline = time.monotonic() + args.wait
    while (state := job_status(args.address, args.job_id).status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"{args.job_id}: {state}")
    return 0


def list_(args: argparse.Namespace, overrides: list[str]) -> int:
    """Every job the cluster knows, newest first."""
    from distgpt.orchestrator.jobs import list_jobs

    rows = list_jobs(args.address)
    if not rows:
        print("no jobs on this cluster")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.start_time)) if r.start_time else ""
        print(f"{r.job_id:28} {r.status:10} {started:19}  {r.entrypoint[:80]}")
    return 0


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p)
    _address(p)
    p.add_argument("--allow-local", action="store_true",
                   help="accept local paths for data and checkpoints (a one-node cluster)")
    p.add_argument("--working-dir", default=".", help="the directory shipped to the cluster (default: here)")
    p.add_argument("--python", default="python",
                   help="the interpreter on the cluster that has distgpt installed (default: python on its PATH)")


def _id(optional: bool = False):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("job_id", nargs="?" if optional else None, default="", help="the id `distgpt submit` printed")
        _address(p)
    return add


def _logs_arguments(p: argparse.ArgumentParser) -> None:
    _id()(p)
    p.add_argument("--follow", action="store_true", help="stream until the job ends")


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    _id()(p)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the job to stop (default 30)")


COMMANDS = [
    Command(("submit",), "submit a training job to a Ray cluster (Ray Jobs)", submit, _submit_arguments),
    Command(("status",), "a submitted job's status (all jobs without an id)", status, _id(optional=True)),
    Command(("logs",), "a submitted job's output (--follow: until it ends)", logs, _logs_arguments),
    Command(("stop",), "stop a submitted job", stop, _stop_arguments),
    Command(("list",), "the jobs a Ray cluster knows", list_, _address),
]
