"""``distgpt config JOB``: the fully resolved job (defaults, file and overrides) as JSON. Imports no torch."""

from __future__ import annotations

import argparse
import json

from distgpt.cli import Command, job_argument


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the resolved job (URIs redacted: credentials in a URI are never printed)."""
    from distgpt.config import load_job, public_dict

    print(json.dumps(public_dict(load_job(args.job, overrides)), indent=2))
    return 0


COMMANDS = [Command(("config",), "print the resolved job configuration", run, job_argument)]
