"""Pipeline parallelism with ``torch.distributed.pipelining``: stage modules, schedules, tied-embedding gradients.

A stage keeps only its blocks (``GPT.layers`` is a ModuleDict keyed by global index), plus the embedding on the first
stage and the final norm + LM head on the last, where the objective's loss runs. The schedule splits the inputs and
a "target" of row numbers into micro-batches alike; the last stage's loss function looks the rows up in the step's
batch, so an objective's batch may hold any columns (masks, weights, log-probabilities).
Stage sizes may be uneven (``Plan.stage_layers``).
With interleaving (``virtual_stages`` v > 1) rank i holds model chunks i, i+pp, …, i+(v−1)·pp.

Data parallelism across pipelines (dp_engine='ddp'): DDP's reducer cannot follow a schedule's many per-micro-batch
backward passes, so after the schedule each rank averages its gradients over the dp group itself, in flat buckets —
the same all-reduce DDP would issue with no_sync, minus overlap with the last backward.

With dp_engine='fsdp' each stage's blocks are FSDP2 units (as torchtitan composes PP with FSDP2): the stage
reduce-scatters gradients after the schedule's last backward, so the engine does not average them itself.

A tied LM head lives twice, as the first stage's embedding and the last stage's head (as in Megatron-LM): after each
backward the two gradients are summed over a two-rank group, so both copies take identical optimizer steps.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from distgpt.data.batch import Batch
from distgpt.model.gpt import GPT
from distgpt.parallel.engine import Engine, Objective, _local, align_grad_layouts, clip_, grad_norm
from distgpt.parallel.mesh import ParallelMesh
from distgpt.parallel.naming import unwrap
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
    m: GPT = unwrap(chunk)  # type: ignore[assignment]
    t, c = seq_len or m.cfg.block_size, m.cfg.n_embd
    hidden = torch.empty(micro, t, c, device="meta")
    inp = torch.empty(micro, t, dtype=torch.long, device="meta") if m.tok_emb is not None else hidden
    return {"input_args": inp} if m.lm_head is not None else {"input_args": inp, "output_args": hidden}


def _schedule(plan, stages: list[PipelineStage], n_micro: int, loss_fn):
    # scale_grads=False: each micro-batch's loss is already its share of the global objective (engine.py)
    if plan.schedule == "gpipe":
        return ScheduleGPipe(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
    if plan.schedule == "1f1b":
        return Schedule1F1B(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn, scale_grads=False)


class PipelineEngine(Engine):
    """Runs a pipeline schedule over this rank's chunks; the loss is known on the last stage and shared."""

    def __init__(self, chunks: list[nn.Module], optimizer, mesh: ParallelMesh, shares: list[int], micro: int,
                 objective: Objective, tied: bool, seq_len: int):
        super().__init__(chunks, optimizer, mesh, shares, micro, objective)
        self.tied = tied
        n_local = shares[mesh.coords["dp"]]
        self.n_micro = n_local // micro
        self._batch: Batch | None = None  # the step's batch on this device: the loss function reads its rows
        self._scale = torch.ones(())  # c = dp / D of the current step
        n_chunks = mesh.plan.pp * mesh.plan.virtual_stages
        self.stages = [
            PipelineStage(c, idx, n_chunks, mesh.device, group=mesh.group("pp"), **_static_meta(c, micro, seq_len))
            for c, idx in zip(chunks, stage_chunk_ids(mesh), strict=True)
        ]
        self.has_first = 0 in stage_chunk_ids(mesh)
        self.has_last = n_chunks - 1 in stage_chunk_ids(mesh)
        self.schedule = _schedule(mesh.plan, self.stages, self.n_micro, self._loss)
        self.eval_schedule = _schedule(mesh.plan, self.stages, self.n_micro, self._eval_loss)

    def _loss(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None
        with self.autocast:
            return self.objective.loss(out, self._batch.rows(rows)) * self._scale

    def _eval_loss(self, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None
        return _local(self.objective.loss(out, self._batch.rows(rows)))

    def _tied_pair(self) -> nn.Parameter | None:
        """The embedding (first stage) or head (last stage) weight shared through the tie group."""
        if not self.tied or self.mesh.tie_group is None:
            return None
        root = unwrap(self.modules[0] if self.has_first else self.modules[-1])
        return root.tok_emb.weight if self.has_first else root.lm_head.weight

    def _run(self, schedule, batch: Batch) -> list[torch.Tensor]:
        if self.objective.model_inputs(batch):
            raise ValueError("pipeline stages take only token ids or hidden states: packed rows (segments) need "
                             "plan.pp = 1 — or set data.packing = false")
        losses: list[torch.Tensor] = []
        self._batch = batch.to(self.mesh.device)
        args = (self._batch.inputs.contiguous(),) if self.has_first else ()  # stages check strides
        rows = torch.arange(len(batch), device=self.mesh.device)
        kwargs = {"target": rows, "losses": losses} if self.has_last else {}
        try:
            with loss_context(self.mesh.plan.tp):
                if schedule is self.schedule:
                    schedule.step(*args, return_outputs=False, **kwargs)
                else:
                    schedule.eval(*args, **kwargs)
        finally:
            self._batch = None
        return losses

    def _stage_value(self, local: torch.Tensor) -> torch.Tensor:
        """The last stage's value, broadcast to the whole pipeline group."""
        group = self.mesh.group("pp")
        if group is not None:
            dist.broadcast(local, group_src=self.mesh.plan.pp - 1, group=group)
        return local

    def train_step(self, batch, lr, clip):
        self.set_lr(lr)
        denom = self.global_normaliser(batch)
        self._scale = self.mesh.plan.dp / denom
        losses = self._run(self.schedule, batch)
        local = torch.zeros((), device=self.mesh.device)
        if self.has_last:  # Σ pieces · c / c
            local = torch.stack([_local(t).detach().float() for t in losses]).sum() / self._scale
        params = self.unique_params()
        align_grad_layouts(params)
        if self.mesh.plan.dp_engine != "fsdp":  # FSDP2 stages reduce-scatter their gradients themselves
            sync_grads(params, self.mesh.group("dp"))
        tied = self._tied_pair()
        if tied is not None:
            dist.all_reduce(_local(tied.grad), group=self.mesh.tie_group)
        # The head copy of a tied weight duplicates the embedding's gradient: count it once in the norm.
        counted = [p for p in params if not (tied is not None and self.has_last and not self.has_first and p is tied)]
        norm = grad_norm(counted, self.mesh.group("pp"))
        if clip > 0:
            clip_(params, clip, norm)
        self.step_optimizer()
        return self.global_loss(self._stage_value(local), denom), norm

    @torch.no_grad()
    def eval_sums(self, batch):
        losses = self._run(self.eval_schedule, batch)
        local = torch.zeros((), device=self.mesh.device)
        if self.has_last:
            local = torch.stack([t.detach().float() for t in losses]).sum()
        return self._stage_value(local), self.objective.normaliser(batch).to(self.mesh.device)


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
