"""The rendezvous store listens on the master address only (env:// and torchrun's own backends would listen on every
interface): distgpt's store on Ray / one process, and torchrun's agent store with ``--rdzv-backend distgpt``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from distgpt.parallel.rendezvous import bound_store

from ..conftest import REPO

ANY = {"00000000", "00000000000000000000000000000000"}
"""0.0.0.0 and ::, as the kernel's socket table writes them."""


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(local.rsplit(":", 1)[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_rank_zero_listens_on_master_addr_only(monkeypatch):
    port = _free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    server = bound_store(timedelta(seconds=30))
    assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
    monkeypatch.setenv("RANK", "1")
    client = bound_store(timedelta(seconds=30))
    client.set("hello", "rank1")
    assert server.get("hello") == b"rank1"
    default = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)  # what env:// does, for contrast
    assert _listening(default.port) & ANY


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_torchrun_finds_the_distgpt_backend_and_its_store_listens_on_the_endpoint_only():
    """Through torch's own registry, as torchrun looks it up (the ``torchrun.handlers`` entry point)."""
    port = _free_port()
    params = RendezvousParameters("distgpt", f"127.0.0.1:{port}", "run1", 1, 2, rank=0)
    server = get_rendezvous_handler(params)
    info = server.next_rendezvous()
    assert server.get_backend() == "distgpt" and server.use_agent_store
    assert _listening(port) == {"0100007F"}
    client = get_rendezvous_handler(RendezvousParameters("distgpt", f"127.0.0.1:{port}", "run1", 1, 2, rank=1))
    other = client.next_rendezvous()
    other.store.set("k", "from node 1")
    assert info.store.get("k") == b"from node 1" and (other.rank, other.world_size) == (1, 2)
    assert (info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) == ("127.0.0.1", port)


@pytest.mark.parametrize("endpoint, nodes, conf, says", [
    ("", 1, {}, "needs --rdzv-endpoint HOST:PORT"),
    ("127.0.0.1", 1, {}, "needs --rdzv-endpoint HOST:PORT"),
    ("127.0.0.1:29500", 2, {}, "--rdzv-conf rank=N"),
])
def test_the_distgpt_backend_says_what_is_missing(endpoint, nodes, conf, says):
    with pytest.raises(ValueError, match=says.replace("-", "\\-")):
        get_rendezvous_handler(RendezvousParameters("distgpt", endpoint, "run1", 1, nodes, **conf))


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_a_torchrun_training_run_with_the_distgpt_backend_listens_on_loopback_only(tiny_data, tmp_path):
    """The real launcher: two ranks train under ``torchrun --rdzv-backend distgpt``; all through the run the
    rendezvous port is open on 127.0.0.1 and never on every interface (torchrun's default backend listens on ``::``)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=distgpt",
           f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "distgpt.cli", "train", str(REPO / "jobs" / "tiny.toml"),
           f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}", "--train.progress=false", "--plan.dp=2",
           "--train.max_steps=20", "--checkpoint.interval=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening(port)
        time.sleep(0.05)
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0, out[-3000:]
    assert seen == {"0100007F"}, seen
    assert (tmp_path / "final" / "model.safetensors").exists()
