"""Training engines: one optimizer step over this rank's share of the global batch, whatever the Plan.

Loss weighting makes every composition compute the gradient of the *global* batch mean. Replica r holds n_r of the
B samples of a step; DDP / FSDP / ZeRO average gradients over the dp replicas, so each replica scales its local mean
loss by w_r = n_r · dp / B: (1/dp) Σ_r w_r ∇mean_r = Σ_r (n_r / B) ∇mean_r = ∇(global mean). With even shares w_r = 1.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distgpt.model.gpt import lm_loss
from distgpt.parallel.mesh import ParallelMesh
from distgpt.parallel.tp import loss_context


def grad_norm(params: list[nn.Parameter], pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params``: DTensor shards reduced over their mesh, then summed over
    pipeline stages. ``params`` must hold each logical parameter once (tied copies excluded by the caller)."""
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        n = g.norm(dtype=torch.float32)
        sq = sq + (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def align_grad_layouts(params: list[nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's placement. DTensor's embedding backward, for one, returns a
    replicated gradient for a vocabulary-sharded weight; collectives on local shards need matching layouts."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def clip_(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (same rule as clip_grad_norm_)."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device))


def replica_weight(mesh: ParallelMesh, shares: list[int]) -> float:
    """w_r = n_r · dp / B (see module docstring)."""
    return shares[mesh.coords["dp"]] * len(shares) / sum(shares)


def global_mean(local_mean: torch.Tensor, mesh: ParallelMesh, shares: list[int]) -> torch.Tensor:
    """Σ_r (n_r / B) mean_r over data-parallel replicas (every rank gets the result)."""
    out = local_mean.detach().float() * (shares[mesh.coords["dp"]] / sum(shares))
    group = mesh.group("dp")
    if group is not None:
        dist.all_reduce(out, group=group)
    return out


class Engine:
    """Common interface; ``LocalEngine`` covers one process, DDP, FSDP2 and tensor parallelism."""

    def __init__(self, modules: list[nn.Module], optimizer: Any, mesh: ParallelMesh, shares: list[int], micro: int):
        self.modules, self.optimizer, self.mesh = modules, optimizer, mesh
        self.shares, self.micro = shares, micro
        self.autocast: contextlib.AbstractContextManager = contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def unique_params(self) -> list[nn.Parameter]:
        """Parameters this rank updates, each logical parameter once (tied head excluded on the last stage)."""
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor):
        """(inputs, targets) of each micro-batch, on this rank's device."""
        for s in range(0, len(x), self.micro):
            yield x[s : s + self.micro].to(self.mesh.device), y[s : s + self.micro].to(self.mesh.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's batch (x, y); returns (global mean loss, gradient norm)."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's samples of the per-sample mean loss (reduced by the caller)."""
        raise NotImplementedError


class LocalEngine(Engine):
    """Micro-batched forward/backward on one module (plain, DDP- or FSDP2-wrapped, tensor-parallel)."""

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        model = self.modules[0]
        if last:
            return contextlib.nullcontext()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()  # accumulate locally; all-reduce once with the last micro-batch
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def train_step(self, x, y, lr, clip):
        self.set_lr(lr)
        model = self.modules[0]
        n, w = len(x), replica_weight(self.mesh, self.shares)
        total = torch.zeros((), device=self.mesh.device)
        count = -(-n // self.micro)
        for i, (xb, yb) in enumerate(self.micro_batches(x, y)):
            last = i == count - 1
            if last and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(True)
            with self._no_sync(last), loss_context(self.mesh.plan.tp):
                with self.autocast:
                    loss = lm_loss(model(xb), yb) * (len(xb) / n)
                (loss * w).backward()
            total += _local(loss.detach())
        params = self.unique_params()
        norm = grad_norm(params, None)
        if clip > 0:
            clip_(params, clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_mean(total, self.mesh, self.shares), norm

    @torch.no_grad()
    def eval_sum(self, x, y):
        total = torch.zeros((), device=self.mesh.device)
        for xb, yb in self.micro_batches(x, y):
            with loss_context(self.mesh.plan.tp), self.autocast:
                total += _local(lm_loss(self.modules[0](xb), yb)) * len(xb)
        return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss under loss_parallel is a replicated DTensor; its local value is the full value."""
    return t.to_local() if isinstance(t, DTensor) else t
