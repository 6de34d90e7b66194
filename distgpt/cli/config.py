"""``distgpt config JOB``: the fully resolved job (defaults, file and overrides) as JSON. Imports no torch."""

from __future__ import annotations

import argparse
import json

from distgpt.cli import Command, job_argument


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the resolved job."""
    from distgpt.config import load_job
    from distgpt.config_schema import to_dict

    print(json.dumps(to_dict(load_job(args.job, overrides)), indent=2))
    return 0


COMMANDS = [Command(("config",), "print the resolved job configuration", run, job_argument)]
