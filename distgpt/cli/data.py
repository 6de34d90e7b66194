"""``distgpt data prepare JOB``: tokenize and shard the job's corpus."""

from __future__ import annotations

import argparse

from distgpt.cli import Command, job_argument


def prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenize and shard the job's corpus into Arrow shards + manifest."""
    from distgpt.config import load_job
    from distgpt.data.prepare import prepare_job

    prepare_job(load_job(args.job, overrides), args.out)
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p)
    p.add_argument("--out", help="where to write (default: the job's data.prepared)")


COMMANDS = [Command(("data", "prepare"), "tokenize a corpus into Arrow shards + manifest", prepare, _arguments,
                    group_help="dataset commands")]
