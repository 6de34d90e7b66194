"""Pipeline parallelism with ``torch.distributed.pipelining``: stage modules, schedules, tied-embedding gradients.

A stage keeps only its blocks (``GPT.layers`` is a ModuleDict keyed by global index), plus the embedding on the first
stage and the final norm + LM head (+ loss) on the last. Stage sizes may be uneven (``Plan.stage_layers``).
With interleaving (``virtual_stages`` v > 1) rank i holds model chunks i, i+pp, …, i+(v−1)·pp.

Data parallelism across pipelines (dp_engine='ddp'): DDP's reducer cannot follow a schedule's many per-micro-batch
backward passes, so after the schedule each rank averages its gradients over the dp group itself, in flat buckets —
the same all-reduce DDP would issue with no_sync, minus overlap with the last backward.

A tied LM head lives twice, as the first stage's embedding and the last stage's head (as in Megatron-LM): after each
backward the two gradients are summed over a two-rank group, so both copies take identical optimizer steps.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from distgpt.model.gpt import GPT, lm_loss
from distgpt.parallel.engine import Engine, _local, align_grad_layouts, clip_, global_mean, grad_norm, replica_weight
from distgpt.parallel.mesh import ParallelMesh
from distgpt.parallel.tp import loss_context


def stage_chunk_ids(mesh: ParallelMesh) -> list[int]:
    """Indices (in pipeline order) of the model chunks this rank holds."""
    plan = mesh.plan
    return [mesh.coords["pp"] + k * plan.pp for k in range(plan.virtual_stages)]


def carve_stage(model: GPT, layer_range: tuple[int, int], first: bool, last: bool) -> GPT:
    """A copy of ``model`` holding only blocks [start, end) and the ends it owns (the original is left intact)."""
    stage = copy.deepcopy(model)
    for key in list(stage.layers.keys()):
        if not layer_range[0] <= int(key) < layer_range[1]:
            del stage.layers[key]
    if not first:
        stage.tok_emb = stage.pos_emb = None
    if not last:
        stage.norm = stage.lm_head = None
    elif stage.lm_head is not None and stage.tok_emb is None and model.cfg.tie_embeddings:
        # Deep-copied tied weight is still one Parameter; give the head its own so the stage owns it outright.
        stage.lm_head.weight = nn.Parameter(stage.lm_head.weight.detach().clone())
    return stage


def _static_meta(chunk: nn.Module, micro: int, seq_len: int) -> dict:
    """Example input/output of a non-final stage, so stages need not exchange shape metadata at start-up.

    (The final stage's output — possibly a vocabulary-sharded DTensor — goes only to the loss, never to a peer.)
    """
    m: GPT = _unwrap(chunk)  # type: ignore[assignment]
    t, c = seq_len or m.cfg.block_size, m.cfg.n_embd
    hidden = torch.empty(micro, t, c, device="meta")
    inp = torch.empty(micro, t, dtype=torch.long, device="meta") if m.tok_emb is not None else hidden
    return {"input_args": inp} if m.lm_head is not None else {"input_args": inp, "output_args": hidden}


def _schedule(plan, stages: list[PipelineStage], n_micro: int, loss_fn):
    if plan.schedule == "gpipe":
        return ScheduleGPipe(stages[0], n_micro, loss_fn=loss_fn)
    if plan.schedule == "1f1b":
        return Schedule1F1B(stages[0], n_micro, loss_fn=loss_fn)
    return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn)


class PipelineEngine(Engine):
    """Runs a pipeline schedule over this rank's chunks; the loss is known on the last stage and shared."""

    def __init__(self, chunks: list[nn.Module], optimizer, mesh: ParallelMesh, shares: list[int], micro: int,
                 tied: bool, seq_len: int):
        super().__init__(chunks, optimizer, mesh, shares, micro)
        self.tied = tied
        n_local = shares[mesh.coords["dp"]]
        self.n_micro = n_local // micro
        self.weight = replica_weight(mesh, shares)
        n_chunks = mesh.plan.pp * mesh.plan.virtual_stages
        self.stages = [
            PipelineStage(c, idx, n_chunks, mesh.device, group=mesh.group("pp"), **_static_meta(c, micro, seq_len))
            for c, idx in zip(chunks, stage_chunk_ids(mesh), strict=True)
        ]
        self.has_first = 0 in stage_chunk_ids(mesh)
        self.has_last = n_chunks - 1 in stage_chunk_ids(mesh)
        self.schedule = _schedule(mesh.plan, self.stages, self.n_micro, self._loss)
        self.eval_schedule = _schedule(mesh.plan, self.stages, self.n_micro, lambda out, y: _local(lm_loss(out, y)))

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return lm_loss(out, y) * self.weight

    def _tied_pair(self) -> nn.Parameter | None:
        """The embedding (first stage) or head (last stage) weight shared through the tie group."""
        if not self.tied or self.mesh.tie_group is None:
            return None
        root = _unwrap(self.modules[0] if self.has_first else self.modules[-1])
        return root.tok_emb.weight if self.has_first else root.lm_head.weight

    def _run(self, schedule, x, y) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        x, y = x.to(self.mesh.device), y.to(self.mesh.device)
        args = (x,) if self.has_first else ()
        kwargs = {"target": y, "losses": losses} if self.has_last else {}
        with loss_context(self.mesh.plan.tp):
            if schedule is self.schedule:
                schedule.step(*args, return_outputs=False, **kwargs)
            else:
                schedule.eval(*args, **kwargs)
        return losses

    def _stage_mean(self, local: torch.Tensor) -> torch.Tensor:
        """Broadcast the last stage's value to the whole pipeline group."""
        group = self.mesh.group("pp")
        if group is not None:
            dist.broadcast(local, group_src=self.mesh.plan.pp - 1, group=group)
        return local

    def train_step(self, x, y, lr, clip):
        self.set_lr(lr)
        losses = self._run(self.schedule, x, y)
        local = torch.zeros((), device=self.mesh.device)
        if self.has_last:
            local = torch.stack([_local(t).detach() for t in losses]).mean() / self.weight
        params = self.unique_params()
        align_grad_layouts(params)
        sync_grads(params, self.mesh.group("dp"))
        tied = self._tied_pair()
        if tied is not None:
            dist.all_reduce(_local(tied.grad), group=self.mesh.tie_group)
        # The head copy of a tied weight duplicates the embedding's gradient: count it once in the norm.
        counted = [p for p in params if not (tied is not None and self.has_last and not self.has_first and p is tied)]
        norm = grad_norm(counted, self.mesh.group("pp"))
        if clip > 0:
            clip_(params, clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_mean(self._stage_mean(local), self.mesh, self.shares), norm

    @torch.no_grad()
    def eval_sum(self, x, y):
        losses = self._run(self.eval_schedule, x, y)
        local = torch.zeros((), device=self.mesh.device)
        if self.has_last:
            local = torch.stack([t.detach() for t in losses]).mean() * len(x)
        return self._stage_mean(local)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def sync_grads(params: list[nn.Parameter], group: dist.ProcessGroup | None, bucket_mb: float = 25.0) -> None:
    """Average gradients over ``group`` in flat buckets of about ``bucket_mb`` (DTensor grads by their local shard)."""
    if group is None:
        return
    grads = [_local(p.grad) for p in params if p.grad is not None]
    size = dist.get_world_size(group)
    bucket: list[torch.Tensor] = []
    limit = bucket_mb * 2**20
    for i, g in enumerate(grads):
        bucket.append(g)
        if sum(t.numel() * t.element_size() for t in bucket) >= limit or i == len(grads) - 1:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=group)
            flat /= size
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket = []
