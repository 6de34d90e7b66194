"""Shared fixtures: a small prepared dataset (byte tokenizer, Python stdlib text) built once per session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray reads this when it is first imported: with it, every Ray process of the test session resolves its own address
# to 127.0.0.1 instead of the machine's external one (all traffic stays on loopback).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray's usage statistics: on by default, a cluster up for a minute posts a report to Ray's public collector, and a
# cluster started like `ray start` (the test clusters) posts a "disabled" report even when they are off. Off, and
# the collector's address pointed at a closed loopback port, so not even that report leaves the machine.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_REPORT_URL"] = "http://127.0.0.1:9/"

import pytest

from distgpt.config import JobConfig, load_job

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A prepared byte-level dataset of ~200 KB of stdlib source, seq_len 64."""
    from distgpt.data.prepare import PrepareSpec, prepare

    out = str(tmp_path_factory.mktemp("tinydata"))
    spec = PrepareSpec(("builtin:python-stdlib",), out, "byte", 0, 64, 0.1, max_bytes=200_000)
    prepare(spec, progress=lambda s: None)
    return out


def tiny_job(tiny_data: str, out_dir: str, *overrides: str) -> JobConfig:
    """jobs/tiny.toml pointed at the shared dataset and a private output directory, no progress bar."""
    return load_job(
        REPO / "jobs" / "tiny.toml",
        [f"--data.prepared={tiny_data}", f"--run.out_dir={out_dir}", "--train.progress=false", *overrides],
    )


@pytest.fixture(autouse=True)
def _single_thread_default(monkeypatch):
    """Tests run on 2 cores, often side by side: keep torch to the threads it is given."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


S3_CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1"}


@contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[int, object]]:
    """(port, pyarrow S3FileSystem) of a real S3-protocol server (moto) bound to 127.0.0.1, with ``bucket`` created
    and the standard AWS credential variables set for the code under test."""
    moto = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    for k, v in S3_CREDS.items():
        mp.setenv(k, v)
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="test",
                               secret_key="test-secret", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield port, fs
    finally:
        mp.undo()
        server.stop()
