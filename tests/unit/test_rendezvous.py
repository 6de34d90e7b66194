"""The rendezvous store listens on the master address only (env:// would listen on every interface)."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from distgpt.parallel.rendezvous import bound_store


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
def test_rank_zero_listens_on_master_addr_only(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    assert _listening(default.port) & {"00000000", "00000000000000000000000000000000"}
