"""``distgpt submit / status / logs / stop / list``: ``distgpt train`` as a Ray job, through Ray's Jobs SDK.

A submission ships the job's directory (``runtime_env.working_dir``, without ``runs/``, ``data/``, ``.venv`` and
``.git``) and runs ``python -m distgpt train JOB [overrides]`` on the head node; the driver there places the ranks as
in any Ray run. Before anything is sent, the job is loaded and validated here, and refused when it cannot work on a
multi-node cluster: a local path for data, checkpoints or ``init.from`` is one node's disk, not the cluster's
(object storage, or ``--allow-local`` on a one-node cluster), and credentials written into a URI would sit in the
job's entrypoint for anyone who can list jobs. The address is ``--address`` or ``$RAY_ADDRESS``; Ray's token
authentication works as Ray's own clients do (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) — distgpt never reads or
prints the token itself.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distgpt.config import JobConfig, load_job
from distgpt.config_schema import ConfigError
from distgpt.errors import DistgptError
from distgpt.orchestrator.credentials import split_credentials
from distgpt.redact import redact

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
"""Job states that do not change again."""
EXCLUDES = ["runs/", "data/", ".venv/", ".git/", "__pycache__/", "*.pyc"]
"""What a submission never uploads: outputs, prepared data, environments (the cluster has its own)."""


class JobsError(DistgptError):
    """The Jobs API cannot be reached, refused us, or does not know the job; the message says which and the fix."""


@dataclass(frozen=True)
class JobRow:
    """One job as ``distgpt list`` shows it."""

    job_id: str
    status: str
    entrypoint: str
    start_time: float | None
    message: str


def jobs_address(address: str) -> str:
    """``address`` or ``$RAY_ADDRESS``; JobsError when neither is set."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise JobsError("no Ray cluster to submit to — pass --address http://HEAD:8265 or set RAY_ADDRESS (for a "
                        "launched cluster, `ray dashboard CLUSTER.yaml` forwards its Jobs API to 127.0.0.1:8265)")
    return address


def client(address: str):
    """A JobSubmissionClient for ``address``: unreachable, or refused credentials, is one JobsError."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    where = jobs_address(address)
    try:
        return JobSubmissionClient(where)
    except AuthenticationError as e:
        raise JobsError(f"the cluster at {redact(where)} refused this client's token ({_first_line(e)}) — set "
                        "RAY_AUTH_TOKEN, or ~/.ray/auth_token, to the cluster's token") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobsError(f"cannot reach the Ray Jobs API at {redact(where)} ({_first_line(e)}) — is the cluster "
                        "up, and is that its dashboard address (http://HEAD:8265)?") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return redact(text[0][:200]) if text else type(e).__name__


def local_paths(job: JobConfig) -> list[str]:
    """Job keys naming paths on this machine's disk, which other nodes cannot see (each 'key: path — fix')."""
    def local(p: str) -> bool:
        return bool(p) and "://" not in p and not p.startswith("builtin:")

    found = [f"data.sources: {s}" for s in job.data.sources if local(s)]
    found += [f"data.mix: {s}" for s in job.data.mix if local(s)]
    for key, value in (("data.prepared", job.data.prepared), ("checkpoint.uri", job.checkpoint.uri),
                       ("init.from", job.init.from_)):
        if local(value):
            found.append(f"{key}: {value}")
    if not job.checkpoint.uri:
        found.append(f"checkpoint.uri: (unset: {job.checkpoint_uri} on the head node)")
    return [f"{f} — a path on this machine, not on every node: use object storage (s3://…, gs://…), or "
            "--allow-local for a one-node cluster" for f in found]


def check_submittable(job_path: str, overrides: list[str], allow_local: bool) -> JobConfig:
    """The job, loaded and validated as ``train`` would; ConfigError listing what cannot work on a cluster."""
    job = load_job(job_path, overrides)
    problems = [] if allow_local else local_paths(job)
    _, secrets = split_credentials(job)
    if any(k.startswith("AWS_") for k in secrets):
        problems.append("a URI carries credentials, which would be visible in the job's entrypoint to anyone who "
                        "can list jobs — give the cluster's nodes AWS credentials (an instance role, a profile, "
                        "or AWS_* variables) and drop them from the URIs")
    if problems:
        raise ConfigError(problems, f"{job_path} (for submission)")
    return job


def submit(job_path: str, overrides: list[str], address: str, allow_local: bool = False,
           working_dir: str = ".", python: str = "python") -> str:
    """Submit ``distgpt train JOB [overrides]`` (run by the cluster's ``python``); return the job id."""
    check_submittable(job_path, overrides, allow_local)
    root = Path(working_dir).resolve()
    job_rel = os.path.relpath(Path(job_path).resolve(), root)
    if job_rel.startswith(".."):
        raise ConfigError([f"{job_path} is outside the directory being shipped ({root}) — run from the project "
                           "directory or pass --working-dir"], "submit")
    entrypoint = shlex.join([python, "-m", "distgpt", "train", job_rel, *overrides])
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES,
                   "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
                                os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")}}
    c = client(address)
    try:
        return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                            metadata={"distgpt_job": job_rel})
    except RuntimeError as e:
        raise JobsError(f"the cluster did not accept the job ({_first_line(e)})") from None


def _known(c, job_id: str):
    """The job's info; JobsError naming an id the cluster does not know."""
    try:
        return c.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobsError(f"no job {job_id!r} on this cluster — `distgpt list` shows the ids it knows") from None
        raise JobsError(f"cannot read job {job_id!r} ({_first_line(e)})") from None


def status(address: str, job_id: str) -> JobRow:
    """One job's status."""
    info = _known(client(address), job_id)
    return _row(info)


def stop(address: str, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    c = client(address)
    _known(c, job_id)
    return bool(c.stop_job(job_id))


def logs(address: str, job_id: str, follow: bool, write: Callable[[str], None]) -> str:
    """Write the job's driver output — all of it so far, or (``follow``) streamed until the job ends; return its
    status then."""
    c = client(address)
    _known(c, job_id)
    if not follow:
        write(c.get_job_logs(job_id))
    else:
        import asyncio

        async def tail() -> None:
            async for chunk in c.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())
    state, deadline = _row(c.get_job_info(job_id)).status, time.monotonic() + 60
    while follow and state not in TERMINAL and time.monotonic() < deadline:  # the log ends before the status does
        time.sleep(0.5)
        state = _row(c.get_job_info(job_id)).status
    return state


def list_jobs(address: str) -> list[JobRow]:
    """Every job the cluster knows, newest first."""
    rows = [_row(j) for j in client(address).list_jobs()]
    return sorted(rows, key=lambda r: r.start_time or 0, reverse=True)


def _row(info) -> JobRow:
    """A JobRow from the SDK's JobDetails (its status an enum, its start time in milliseconds)."""
    status = getattr(info.status, "value", info.status)
    started = info.start_time / 1000 if info.start_time else None
    return JobRow(info.submission_id or info.job_id or "?", str(status), redact(info.entrypoint or ""), started,
                  redact(info.message or ""))
