"""Training engines: one optimizer step over this rank's share of the global batch, whatever the Plan.

An engine is given an objective (``train/objectives``) and never names a loss. Loss weighting makes every
composition compute the gradient of the objective over the *global* batch, L = N / D with N = Σ_r N_r the sum of
every replica's weighted token losses and D = Σ_r D_r the global normaliser (for next-token prediction, the number
of target tokens). Each step first all-reduces D over the data-parallel group (one scalar). DDP / FSDP / ZeRO then
*average* gradients over the dp replicas, so replica r back-propagates c · N_r with c = dp / D:
(1/dp) Σ_r ∇(dp · N_r / D) = ∇(N / D). Micro-batches simply add their pieces of N_r (no per-micro-batch means), so
uneven shares, masks or packing change nothing. The reported loss is Σ_r N_r / D (all-reduced), the global mean.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from distgpt.data.batch import Batch
from distgpt.parallel import naming
from distgpt.parallel.mesh import ParallelMesh
from distgpt.parallel.tp import loss_context


class Objective(Protocol):
    """What an engine needs of a training objective (``distgpt.train.objectives`` has them)."""

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """N for the rows of ``batch``: the sum of their weighted token losses (0-d)."""

    def normaliser(self, batch: Batch) -> torch.Tensor:
        """D for the rows of ``batch`` (0-d float)."""

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keyword inputs of the model's forward besides the tokens (packed segments)."""


def grad_norm(params: list[nn.Parameter], pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params``: DTensor shards reduced over their mesh, then summed over
    pipeline stages. ``params`` must hold each logical parameter once (tied copies excluded by the caller)."""
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    grads = [p.grad for p in params if p.grad is not None]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:  # one fused kernel over all plain gradients (as clip_grad_norm_ does)
        sq = sq + _sum_sq(plain)
    sq = sq + _sharded_sum_sq([g for g in grads if isinstance(g, DTensor)])
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors)).float().square().sum()


def _sharded_sum_sq(grads: list[DTensor]) -> torch.Tensor:
    """Σ‖g‖² over DTensor gradients with one all-reduce per sharded mesh dimension, not one per tensor: local
    shards' squares summed per (mesh, sharded dims), then summed over those dims' groups (a replicated dim holds
    the same values on every rank, so it is not summed). A Partial gradient is made whole first."""
    by_layout: dict[tuple[int, tuple[int, ...]], tuple[DeviceMesh, list[torch.Tensor]]] = {}
    for g in grads:
        if any(pl.is_partial() for pl in g.placements):
            g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
        dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())  # Shard, _StridedShard
        by_layout.setdefault((id(g.device_mesh), dims), (g.device_mesh, []))[1].append(g.to_local())
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for (_, dims), (mesh, local) in by_layout.items():
        sq = _sum_sq(local)
        for d in dims:
            dist.all_reduce(sq, group=mesh.get_group(d))
        total = total + sq
    return total


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
    plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if plain:
        torch._foreach_mul_(plain, coef.to(plain[0].device))
    for p in params:
        if isinstance(p.grad, DTensor):
            p.grad.mul_(coef.to(p.grad.device))


def dp_sum(value: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """``value`` summed over the data-parallel replicas (every rank gets the result)."""
    out = value.detach().float().to(mesh.device)
    group = mesh.group("dp")
    if group is not None:
        dist.all_reduce(out, group=group)
    return out


def precision_context(plan, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the Plan's dtype (bf16), else nothing: the Plan is the one owner of precision."""
    if plan.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_state_bytes(modules: list[Any], optimizer: Any) -> int:
    """Bytes this rank holds for training state: its parameters (their local shard), their gradients (DDP's
    buckets, when the gradients are views of them) and the optimizer's state — what the planner's
    ``cost.state_bytes`` predicts. Counted by storage, so a tied weight or a view of a flat buffer counts once."""
    tensors: list[torch.Tensor] = []
    for m in modules:
        for p in m.parameters():
            tensors += [p, p.grad] if p.grad is not None else [p]
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    for group in base.param_groups:
        tensors += [p for p in group["params"]]
    for state in base.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]  # not Adam's step
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.device.type != "meta":
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())



class Engine:
    """Common interface; ``LocalEngine`` covers one process, DDP, FSDP2 and tensor parallelism."""

    def __init__(self, modules: list[nn.Module], optimizer: Any, mesh: ParallelMesh, shares: list[int], micro: int,
                 objective: Objective):
        self.modules, self.optimizer, self.mesh = modules, optimizer, mesh
        self.shares, self.micro = shares, micro
        self.objective = objective
        self.autocast = precision_context(mesh.plan, mesh.device)
        self._in_flight: list[Any] = []  # the last step's loss all-reduce, still running (see ``global_loss``)
        self.state_bytes: int | None = None
        """This rank's training state, measured at the first step's peak (``training_state_bytes``)."""

    def step_optimizer(self) -> None:
        """Apply the step and free the gradients; on the first, measure the training state while the gradients
        and the optimizer's moments are both held (the step's peak)."""
        self.optimizer.step()
        if self.state_bytes is None:
            self.state_bytes = training_state_bytes(self.modules, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps this rank's parameters (checkpoints hook its steps)."""
        return self.optimizer

    def state_dicts(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts under the model's canonical parameter names, whatever the sharding."""
        return naming.canonical_state_dicts(self.modules, self.optimizer)

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        """Load state in the canonical naming (as ``state_dicts`` returns it, possibly from another Plan)."""
        naming.load_canonical_state_dicts(self.modules, self.optimizer, model_sd, optim_sd)

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

    def micro_batches(self, batch: Batch):
        """Each micro-batch of this rank's batch, on this rank's device."""
        for s in range(0, len(batch), self.micro):
            yield batch.rows(slice(s, s + self.micro)).to(self.mesh.device)

    def global_normaliser(self, batch: Batch) -> torch.Tensor:
        """D: the objective's normaliser summed over the whole global batch — known without communication where
        the objective says so (``known_normaliser``), else one scalar all-reduce."""
        known = getattr(self.objective, "known_normaliser", None)
        value = known(batch, sum(self.shares)) if known is not None else None
        if value is not None:
            if len(self._in_flight) > 64:  # nothing has read the losses for a while: collect the finished reductions
                self.settle()
            return torch.tensor(value, device=self.mesh.device)
        denom = dp_sum(self.objective.normaliser(batch), self.mesh)
        self.settle()  # collectives complete in order: the last step's loss is in already, so this waits for nothing
        return denom

    def global_loss(self, local_sum: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """Σ_r N_r / D, summed over the replicas *without waiting*: the all-reduce runs while the next step starts,
        so a step has one synchronising collective of its own (D), not two. Read the value after ``settle()``."""
        out = (local_sum.detach().float().to(self.mesh.device) / denom)
        group = self.mesh.group("dp")
        if group is not None:
            self._in_flight.append(dist.all_reduce(out, group=group, async_op=True))
        return out

    def settle(self) -> None:
        """Wait for the losses still being reduced (before they are read)."""
        for work in self._in_flight:
            work.wait()
        self._in_flight.clear()

    def train_step(self, batch: Batch, lr: float, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's batch; returns (the objective over the global batch, gradient norm).
        The loss may still be being summed over the replicas: read it after ``settle()``."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_sums(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_r, D_r): this rank's loss numerator and normaliser on ``batch`` (the caller reduces and divides)."""
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

    def train_step(self, batch, lr, clip):
        self.set_lr(lr)
        model = self.modules[0]
        denom = self.global_normaliser(batch)
        scale = self.mesh.plan.dp / denom  # c = dp / D (module docstring)
        total = torch.zeros((), device=self.mesh.device)
        count = -(-len(batch) // self.micro)
        for i, mb in enumerate(self.micro_batches(batch)):
            last = i == count - 1
            if last and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(True)
            with self._no_sync(last), loss_context(self.mesh.plan.tp):
                with self.autocast:
                    piece = self.objective.loss(model(mb.inputs, **self.objective.model_inputs(mb)), mb)
                (piece * scale).backward()
            total += _local(piece.detach()).float()
        params = self.unique_params()
        norm = grad_norm(params, None)
        if clip > 0:
            clip_(params, clip, norm)
        self.step_optimizer()
        return self.global_loss(total, denom), norm

    @torch.no_grad()
    def eval_sums(self, batch):
        total = torch.zeros((), device=self.mesh.device)
        for mb in self.micro_batches(batch):
            with loss_context(self.mesh.plan.tp), self.autocast:
                out = self.modules[0](mb.inputs, **self.objective.model_inputs(mb))
                total += _local(self.objective.loss(out, mb)).float()
        return total, self.objective.normaliser(batch).to(self.mesh.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A loss under loss_parallel is a replicated DTensor; its local value is the full value."""
    return t.to_local() if isinstance(t, DTensor) else t
