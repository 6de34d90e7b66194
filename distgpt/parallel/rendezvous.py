"""The rendezvous store, listening on the master address only.

``init_process_group("env://")`` starts rank 0's TCPStore listening on every interface (``::``), whatever
``MASTER_ADDR`` says — on a machine with a public interface, a port anyone can reach. TCPStore takes a listening
socket instead (``master_listen_fd``), so rank 0 binds one to ``MASTER_ADDR:MASTER_PORT`` itself and hands it over;
the other ranks connect as clients.

Under torchrun the store is its agent's (``TORCHELASTIC_USE_AGENT_STORE``), made by the rendezvous backend; torch's
own (``static``, ``c10d``) listen on every interface too. distgpt registers one more backend with torchrun
(``torchrun.handlers`` entry point ``distgpt``): torch's static rendezvous, with the node-rank-0 agent's store on a
socket bound to the endpoint's address — ``torchrun --rdzv-backend distgpt --rdzv-endpoint ADDR:PORT``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

_LISTENERS: list[socket.socket] = []
"""Sockets handed to a TCPStore: kept open for the life of the process (closing one would close the store's)."""


def under_torchrun_agent() -> bool:
    """Whether torchrun's agent already runs the store this process must use."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def bound_store(timeout: timedelta) -> dist.TCPStore:
    """This rank's TCPStore from the torchrun-style environment: on rank 0 a server listening on ``MASTER_ADDR``
    only, on the others a client of it."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        return dist.TCPStore(addr, port, world, False, timeout=timeout)
    fd = listen_on(addr, port, world, "rank 0 cannot listen on MASTER_ADDR:MASTER_PORT")
    return dist.TCPStore(addr, port, world, True, timeout=timeout, wait_for_workers=False, master_listen_fd=fd)


def listen_on(addr: str, port: int, backlog: int, who: str) -> int:
    """A socket listening on ``addr:port`` only, kept open for the process's life; its file descriptor."""
    family, _, _, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted rank 0 reuses the port at once
    try:
        listener.bind(where)
    except OSError as e:
        listener.close()
        raise OSError(f"{who} {addr}:{port} ({e}) — is another run using the port, or is the address not this "
                      "machine's?") from None
    listener.listen(max(128, backlog))
    _LISTENERS.append(listener)
    return listener.fileno()
