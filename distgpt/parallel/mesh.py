"""Process groups from a Plan: one DeviceMesh whose dimensions follow the Plan's rank order.

The rank-order string is the single definition of placement (as in Megatron-core): ``"tp-dp-pp"`` means tp varies
fastest, so DeviceMesh (row-major, last dimension fastest) is built with dims ("pp", "dp", "tp"). Groups are held on
this object and passed explicitly; there are no module-level globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distgpt.parallel.rendezvous import bound_store, under_torchrun_agent
from distgpt.planner.plan import Plan, PlanError


@dataclass
class ParallelMesh:
    """This rank's place in the Plan and the groups it talks over."""

    plan: Plan
    rank: int
    device: torch.device
    mesh: DeviceMesh | None = None
    tie_group: dist.ProcessGroup | None = None
    """First and last pipeline stage of this (dp, tp) coordinate: they share the tied embedding's gradient."""
    coords: dict[str, int] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        """Whether more than one rank takes part."""
        return self.mesh is not None

    def size(self, dim: str) -> int:
        """Degree of ``dim`` ('dp', 'tp' or 'pp')."""
        return getattr(self.plan, dim)

    def submesh(self, *dims: str) -> DeviceMesh:
        """The (sub)mesh over ``dims``."""
        assert self.mesh is not None
        return self.mesh[dims if len(dims) > 1 else dims[0]]

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """Process group along ``dim``, or None where that degree is 1 (no communication needed)."""
        if self.mesh is None or self.size(dim) == 1:
            return None
        return self.mesh.get_group(dim)


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Join the default process group from torchrun-style environment variables (gloo on CPU, nccl on GPU)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    from datetime import timedelta

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    keep_gloo_on_loopback()
    if under_torchrun_agent():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return
    store = bound_store(timedelta(seconds=timeout_s))  # listens on MASTER_ADDR only (env:// would listen on all)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))


def keep_gloo_on_loopback() -> None:
    """A loopback rendezvous (MASTER_ADDR 127.x) means one machine: keep gloo's own connections on loopback too. By
    default gloo uses the address the hostname resolves to, which may be an external interface. The one place this
    rule lives: torchrun ranks, Ray workers and the checkpoint writer's group all come through here."""
    if os.environ.get("MASTER_ADDR", "").startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL's bootstrap sockets likewise


def ensure_process_group() -> None:
    """A process group exists afterwards: the job's, or for a one-process run a one-rank gloo group on loopback
    (DCP's background save process needs one even for a single rank; it inherits the environment set here)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    keep_gloo_on_loopback()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Without this, the group is torn down by interpreter-exit destructors, which may run while gloo's (or DeepSpeed's
    shared-memory) background threads are still joinable — and abort the process ("terminate called without an
    active exception") after training has succeeded. ``wait=False`` (after an error) skips the barrier, which the
    failed ranks would never reach.
    """
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def build_mesh(plan: Plan, device: torch.device | None = None) -> ParallelMesh:
    """The ParallelMesh of the calling rank (world size 1 needs no process group)."""
    device = device or device_for_rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    plan_world = plan.world_size
    if world != plan_world:
        raise PlanError([f"the plan needs {plan_world} ranks (dp×tp×pp) but {world} are running"])
    if world == 1:
        return ParallelMesh(plan, 0, device, coords={"dp": 0, "tp": 0, "pp": 0})
    rank = dist.get_rank()
    order = plan.rank_order.split("-")[::-1]  # slowest first, as DeviceMesh lays out dims
    mesh = init_device_mesh(device.type, tuple(getattr(plan, d) for d in order), mesh_dim_names=tuple(order))
    pm = ParallelMesh(plan, rank, device, mesh, coords=plan.coords(rank))
    if plan.pp > 1:
        pm.tie_group = _tie_groups(plan, rank)
    return pm


def _tie_groups(plan: Plan, rank: int) -> dist.ProcessGroup | None:
    """Every rank creates every first/last-stage pair group (collective), keeping the one it belongs to."""
    mine = None
    for dp in range(plan.dp):
        for tp in range(plan.tp):
            ranks = [plan.rank_of(dp=dp, tp=tp, pp=0), plan.rank_of(dp=dp, tp=tp, pp=plan.pp - 1)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine
