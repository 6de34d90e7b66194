"""``parallelize(model, plan, mesh)`` — the one entry point that turns a plain GPT into a training engine.

Order (as torchtitan): pipeline split → tensor parallel → activation recomputation → compilation (per block) → data
parallel → optimizer → pipeline stages and schedule. What composes (anything else is rejected by ``Plan.validate``):

    dp engine  | + tp | + pp | + tp + pp | uneven batch shares
    ddp        | yes  | yes  |   yes    | yes
    fsdp       | yes  | yes  |   yes    | yes
    deepspeed  |  no  |  no  |    no    | no
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from distgpt.model.gpt import GPT
from distgpt.parallel.compile import apply_compile
from distgpt.parallel.dp import DeepSpeedEngine, apply_ddp, apply_fsdp, apply_replicate, deepspeed_config
from distgpt.parallel.engine import Engine, LocalEngine, Objective
from distgpt.parallel.materialize import Init, WeightSource, is_meta, materialize, materialize_partitioned
from distgpt.parallel.mesh import ParallelMesh
from distgpt.parallel.naming import drop_tied_head
from distgpt.parallel.optim import make_optimizer, param_groups
from distgpt.parallel.pp import PipelineEngine, carve_stage, stage_chunk_ids
from distgpt.parallel.recompute import apply_recompute
from distgpt.parallel.tp import apply_tp


@dataclass(frozen=True)
class OptimSettings:
    """What the engine needs of the job's [train] section."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    global_batch: int
    seq_len: int = 0  # tokens per sample (0: the model's block size); pipeline stages are built for this shape


def _prepare_module(model: GPT, mesh: ParallelMesh) -> GPT:
    plan = mesh.plan
    if plan.tp > 1:
        apply_tp(model, mesh.submesh("tp"))
    if plan.recompute:
        apply_recompute(model)
    if plan.compile:
        apply_compile(model)
    return model


def _data_parallel(module: GPT, mesh: ParallelMesh, init: Init) -> torch.nn.Module:
    """Wrap a (tensor-parallel) module for data parallelism as the Plan's engine says (not DeepSpeed), giving a
    meta-device module its values where this rank's part is known: after FSDP2 / replicate shard it, before DDP
    (which broadcasts real tensors as it wraps)."""
    plan = mesh.plan
    if plan.dp_engine == "fsdp" or plan.tp > 1:
        wrap = apply_fsdp(module, mesh, plan.dtype == "bf16") if plan.dp_engine == "fsdp" else \
            apply_replicate(module, mesh)
        return _materialized(wrap, mesh, init)
    return apply_ddp(_materialized(module, mesh, init), mesh)


def _deepspeed_module(model: GPT, mesh: ParallelMesh, init: Init, cfg: dict) -> GPT:
    """The real module DeepSpeed's engine takes. Under ZeRO-3 a meta-device model is made one module at a time and
    each partitioned by ``zero.Init`` at once (no rank holds the whole model); ZeRO-1/2 keep every parameter on
    every rank by design, and a checkpoint root's reader fills whole parameters, so those are made whole first."""
    if not (is_meta(model) and mesh.plan.zero_stage == 3 and not hasattr(init, "fill")):
        return _materialized(model, mesh, init)
    if mesh.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed loads: it probes for accelerators
    import deepspeed

    from distgpt.parallel.mesh import ensure_process_group

    ensure_process_group()  # zero.Init broadcasts and partitions over the data-parallel group
    # DeepSpeed's own comm layer over the existing process group (as deepspeed.initialize would set it up), so the
    # config's batch check sees the real world size; mem_efficient_linear off: with a module it would patch
    # F.linear for the whole process
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    return materialize_partitioned(model, mesh.device, init, lambda sub: deepspeed.zero.Init(
        module=sub, config_dict_or_path=cfg, mem_efficient_linear=False))


def _materialized(module: torch.nn.Module, mesh: ParallelMesh, init: Init) -> torch.nn.Module:
    return materialize(module, mesh.device, init) if is_meta(module) else module


def parallelize(model: GPT, mesh: ParallelMesh, opt: OptimSettings, objective: Objective, seed: int = 0,
                weights: WeightSource | None = None) -> Engine:
    """Shard ``model`` as ``mesh.plan`` says and return the engine that trains it on ``objective``.

    ``model`` is either built on the meta device — then each rank gives only its part storage and values
    (``materialize.py``): those a one-process ``GPT`` seeded with ``seed`` has, or, given ``weights``, the trained
    ones, one tensor at a time — or a real model identical on every rank, of which each rank keeps its part."""
    init: Init = weights if weights is not None else seed
    plan = mesh.plan
    plan.validate(model.cfg, plan.world_size, opt.global_batch)
    shares = plan.shares(opt.global_batch)
    share = shares[mesh.coords["dp"]]
    micro = plan.micro_batch_size or share
    if not is_meta(model):
        model = model.to(mesh.device)
    if plan.dp_engine == "deepspeed":
        cfg = deepspeed_config(plan, micro, share // micro, opt.lr, opt.betas, opt.weight_decay, opt.grad_clip)
        model = _deepspeed_module(model, mesh, init, cfg)
        return DeepSpeedEngine(_prepare_module(model, mesh), param_groups(model, opt.weight_decay), mesh, shares,
                               micro, objective, cfg)
    if plan.pp > 1:
        return _pipeline(model, mesh, opt, shares, micro, objective, init)
    module = _data_parallel(_prepare_module(model, mesh), mesh, init)
    optimizer = make_optimizer(module, opt.lr, opt.weight_decay, opt.betas)
    return LocalEngine([module], optimizer, mesh, shares, micro, objective)


def _pipeline(model: GPT, mesh: ParallelMesh, opt: OptimSettings, shares: list[int], micro: int,
              objective: Objective, init: Init) -> Engine:
    plan = mesh.plan
    ranges = plan.layer_ranges(model.cfg.n_layer)
    n_chunks = len(ranges)
    chunks = []
    for idx in stage_chunk_ids(mesh):
        chunk = _prepare_module(carve_stage(model, ranges[idx], first=idx == 0, last=idx == n_chunks - 1), mesh)
        # FSDP2 shards each stage's blocks (the stage runs its reduce-scatter after the last micro-batch); with
        # 'ddp' the engine averages dp gradients itself after the schedule (see pp.py)
        fsdp = plan.dp_engine == "fsdp"
        chunk = apply_fsdp(chunk, mesh, plan.dtype == "bf16", reshard_after_forward=False) if fsdp else chunk
        chunks.append(_materialized(chunk, mesh, init))
    container = torch.nn.ModuleList(chunks)
    optimizer = make_optimizer(container, opt.lr, opt.weight_decay, opt.betas)
    return PipelineEngine(chunks, optimizer, mesh, shares, micro, objective, model.cfg.tie_embeddings, opt.seq_len)


def full_state_dict(engine: Engine) -> dict[str, torch.Tensor]:
    """The whole model's parameters as plain CPU tensors on every rank, whatever the sharding.

    DTensor shards (FSDP2, TP) are gathered by ``get_model_state_dict``; pipeline stages exchange their parts. A tied
    head is dropped (it is the embedding). Meant for export and tests, not for checkpoints of large models.
    """
    if isinstance(engine, DeepSpeedEngine):
        sd = engine.full_state_dict()
    else:
        sd = {}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
        for m in engine.modules:
            part = get_model_state_dict(m, options=opts)
            sd.update({k: v.detach().clone().cpu() for k, v in part.items()})
        if isinstance(engine, PipelineEngine) and engine.mesh.group("pp") is not None:
            parts: list[dict] = [None] * engine.mesh.plan.pp  # type: ignore[list-item]
            dist.all_gather_object(parts, sd, group=engine.mesh.group("pp"))
            sd = {k: v for part in parts for k, v in part.items()}
    cfg = next(sub.cfg for m in engine.modules for sub in m.modules() if isinstance(sub, GPT))
    return drop_tied_head(sd, cfg.tie_embeddings)


__all__ = ["OptimSettings", "parallelize", "full_state_dict", "Engine", "Objective"]
