"""torchrun's ``distgpt`` rendezvous backend: torch's static rendezvous, listening on the endpoint's address only.

torchrun's agent on node rank 0 runs the store every process of the run joins (``TORCHELASTIC_USE_AGENT_STORE``).
torch's ``static`` and ``c10d`` backends start it listening on every interface (``::``) whatever ``--master-addr``
or ``--rdzv-endpoint`` says. Registered through the ``torchrun.handlers`` entry point (pyproject.toml), this backend
binds the store's socket to the endpoint's address itself and hands it to the TCPStore (``master_listen_fd``)::

    torchrun --nproc-per-node 4 --rdzv-backend distgpt --rdzv-endpoint 127.0.0.1:29500 -m distgpt.cli train JOB
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend distgpt --rdzv-endpoint 10.0.0.1:29500 \\
        --rdzv-conf rank=NODE_RANK -m distgpt.cli train JOB

Like ``static`` it needs each node's rank: torchrun hands ``--node-rank`` to ``static`` only, so with more than one
node it is ``--rdzv-conf rank=N`` (one node: 0).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from distgpt.parallel.rendezvous import listen_on

DEFAULT_TIMEOUT_S = 600
"""torch's static rendezvous default: how long the store waits for every node."""


class BoundStaticRendezvous(StaticTCPRendezvous):
    """torch's static rendezvous whose node-rank-0 store listens on ``master_addr`` only."""

    def get_backend(self) -> str:
        """The name torchrun knows this backend by."""
        return "distgpt"

    def next_rendezvous(self) -> RendezvousInfo:
        """This node's view of the rendezvous; node rank 0 starts the store on its first call (a restart keeps it)."""
        if not self._store:
            server = self.rank == 0
            fd = listen_on(self.master_addr, self.master_port, self.world_size,
                         "torchrun --rdzv-backend distgpt: node rank 0 cannot listen on") if server else None
            self._store = TCPStore(self.master_addr, self.master_port, self.world_size, server, self.timeout,
                                   wait_for_workers=False, master_listen_fd=fd)
        return RendezvousInfo(PrefixStore(self.run_id, self._store), self.rank, self.world_size,
                              RendezvousStoreInfo(self.master_addr, self.master_port))


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The handler for torchrun's parameters; a ValueError (torchrun prints it) saying what to add when one is
    missing."""
    host, port = parse_rendezvous_endpoint(params.endpoint.strip(), -1)
    if not params.endpoint.strip() or port == -1:
        raise ValueError("--rdzv-backend distgpt needs --rdzv-endpoint HOST:PORT (the address node rank 0 listens on, "
                         "e.g. 127.0.0.1:29500 on one machine)")
    rank = params.config.get("rank")
    if rank is None and params.max_nodes > 1:
        raise ValueError("--rdzv-backend distgpt on more than one node needs each node's rank: add "
                         "--rdzv-conf rank=N (0 on the node at --rdzv-endpoint)")
    timeout = int(params.config.get("timeout", DEFAULT_TIMEOUT_S))
    return BoundStaticRendezvous(host, port, int(rank or 0), params.max_nodes, params.run_id, timeout)


def torchrun_handler() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The ``torchrun.handlers`` entry point: torchrun calls it for the handler factory it registers."""
    return create_handler
