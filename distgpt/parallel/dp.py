"""Data parallelism: DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO 1/2/3.

* DDP: each replica holds everything; gradients are all-reduced (averaged) in buckets overlapping backward.
  With tensor parallelism (dp×tp) ``DistributedDataParallel`` cannot hold DTensor parameters, so the replicas are
  made by torch's FSDP2-based ``replicate`` instead: per block, like FSDP2, but with nothing sharded — each block's
  gradients are all-reduced over the dp mesh as its backward finishes (the same overlap as DDP's buckets).
* FSDP2: parameters, gradients and optimizer states sharded over the dp mesh (dim 0 of every tensor). Forward
  all-gathers a block's parameters just in time; backward reduce-scatters (averages) its gradients. Each block is
  its own unit so that only one block is ever gathered.
* DeepSpeed ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also parameters. DeepSpeed owns the optimizer
  step and gradient accumulation; we set its learning rate each step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from distgpt.parallel import ds_state
from distgpt.parallel.engine import LocalEngine, Objective
from distgpt.parallel.mesh import ParallelMesh, ensure_process_group


def apply_ddp(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """Wrap in DDP over the data-parallel group (no-op for dp = 1)."""
    group = mesh.group("dp")
    if group is None:
        return model
    ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    # Gradients as views of the all-reduce buckets: one copy of them, not two (the planner's memory model counts
    # one), and no copy into the buckets after each backward.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=group,
                                               gradient_as_bucket_view=True)


def apply_replicate(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """DDP semantics over the dp mesh for a module whose parameters are DTensors (tensor-parallel): ``replicate``
    each block, then the root. Precision stays with the Plan's autocast, as for plain DDP."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    if mesh.group("dp") is None:
        return model
    dp_mesh = mesh.submesh("dp")
    for block in model.layers.values():
        replicate(block, mesh=dp_mesh)
    replicate(model, mesh=dp_mesh)
    return model


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each block, then the root (embedding, norm, head), over the dp mesh.

    Inside a pipeline stage ``reshard_after_forward=False`` (as torchtitan): the schedule runs many micro-batches per
    step and the stage keeps gradients unsharded until the last backward anyway, so re-gathering every block once
    per micro-batch would only add traffic. Between steps the parameters are sharded either way."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.group("dp") is None:
        return model
    dp_mesh = mesh.submesh("dp")
    # bf16: compute in bf16, reduce gradients in fp32 (sharded fp32 master weights stay in the optimizer).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mp = mp or MixedPrecisionPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root (embedding, norm, head) is left to FSDP's own default, which keeps it gathered from forward to
    # backward: backward needs it at once, so resharding it would only gather it again. Passing True explicitly
    # turns that default off (measured: two extra all-gathers of the root per step, 5% of a CPU step).
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=None if reshard_after_forward else False)
    return model


def deepspeed_config(plan, micro: int, n_micro: int, lr: float, betas: tuple[float, float], wd: float,
                     clip: float) -> dict[str, Any]:
    """The DeepSpeed JSON config for this plan (torch's AdamW: no compiled optimizer ops needed)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": n_micro,
        "train_batch_size": micro * n_micro * plan.dp,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": plan.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "weight_decay": wd,
                                                  "torch_adam": True}},
        "bf16": {"enabled": plan.dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(LocalEngine):
    """ZeRO via ``deepspeed.initialize``. DeepSpeed itself divides each micro-batch loss by the accumulation steps
    and averages gradients over dp, so a piece N_mb is scaled by dp · n_micro / D (see ``engine.py``)."""

    def __init__(self, model: nn.Module, groups: list[dict], mesh: ParallelMesh, shares: list[int], micro: int,
                 objective: Objective, config: dict[str, Any]):
        if mesh.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for accelerators it won't find
        import deepspeed

        # DeepSpeed needs a process group even for one rank (a planner's dp1 ZeRO plan): a one-rank gloo one
        ensure_process_group()
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=config, dist_init_required=False
        )
        super().__init__([engine], optimizer, mesh, shares, micro, objective)
        self.engine = engine

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the torch optimizer ZeRO steps on its flat partitions

    def state_dicts(self) -> tuple[dict, dict]:
        return ds_state.state_dicts(self)

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        ds_state.load_state_dicts(self, model_sd, optim_sd)

    def train_step(self, batch, lr, clip):
        self.set_lr(lr)
        total = torch.zeros((), device=self.mesh.device)
        denom = self.global_normaliser(batch)
        scale = self.mesh.plan.dp * self.engine.gradient_accumulation_steps() / denom
        for mb in self.micro_batches(batch):
            with self.autocast:
                piece = self.objective.loss(self.engine(mb.inputs, **self.objective.model_inputs(mb)), mb)
            self.engine.backward(piece * scale)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += piece.detach().float()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(norm if norm is not None else 0.0, dtype=torch.float32)
        return self.global_loss(total, denom), norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, gathered from its ZeRO-3 partitions where needed, on every rank."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.mesh.plan.zero_stage == 3):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
