"""DeepSpeed ZeRO state in the checkpoint's canonical layout: the one DDP, FSDP2, TP and PP checkpoints use.

A ZeRO optimizer keeps each parameter group as one flat fp32 tensor cut into per-rank partitions, with the Adam
moments laid out the same way. DeepSpeed's own checkpoints keep that layout (and pickle it), so they only load into
the same ZeRO stage and data-parallel size. Here every parameter's fp32 master value and Adam moments are assembled
under its model name (``tok_emb.weight``, ``state.tok_emb.weight.exp_avg`` …) exactly as
``torch.distributed.checkpoint.state_dict.get_state_dict`` names a plain optimizer's state. DCP then writes each
tensor once (replicated tensors are spread over the ranks) and any Plan can load it; loading copies each rank's
fragment back into its partition.

The price: while saving or loading, every rank briefly holds one full fp32 copy of parameters and moments (what
DDP holds all the time). Assembling goes one tensor at a time through all-reduces over the data-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero(engine):
    """The ZeRO optimizer of a distgpt DeepSpeedEngine."""
    return engine.engine.optimizer


def _stage3(zopt) -> bool:
    return hasattr(zopt, "fp32_partitioned_groups_flat")


def _flats(zopt) -> list[torch.Tensor]:
    """Every flat fp32 partition of this rank: the tensors the base optimizer steps and keeps state for."""
    return zopt.fp32_partitioned_groups_flat if _stage3(zopt) else zopt.single_partition_of_fp32_groups


def _ensure_moments(zopt) -> None:
    """torch's AdamW creates its state lazily at the first step; a fresh engine being loaded needs it now."""
    for flat in _flats(zopt):
        st = zopt.optimizer.state[flat]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            for key in MOMENTS:
                st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def _params(zopt, module: nn.Module) -> Iterator[tuple[str, nn.Parameter, int]]:
    """(canonical name, parameter, ZeRO group index); a tied parameter once, under its first name."""
    groups = zopt.fp16_groups if _stage3(zopt) else zopt.bit16_groups
    index = {id(p): i for i, group in enumerate(groups) for p in group}
    yield from ((name, p, index[id(p)]) for name, p in module.named_parameters())


def _flat(zopt, p: nn.Parameter, i: int) -> torch.Tensor:
    """The flat fp32 partition (the base optimizer's parameter) that holds ``p``'s fragment on this rank."""
    if _stage3(zopt):
        return zopt.fp32_partitioned_groups_flat[zopt.grad_position[zopt.get_param_id(p)][0]]
    return zopt.single_partition_of_fp32_groups[i]


def _get_full(zopt, p: nn.Parameter, i: int, key: str | None) -> torch.Tensor:
    """The whole fp32 tensor (master value when ``key`` is None, else that Adam moment), on every rank."""
    if _stage3(zopt):
        return zopt.get_full_hp_param(p, key).reshape(p.ds_shape).cpu()
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    m = p._hp_mapping
    if m is not None:  # this rank owns the slice [lp.start, lp.start + numel) of the flattened parameter
        src = _flat(zopt, p, i) if key is None else zopt.optimizer.state[_flat(zopt, p, i)][key]
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        buf.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
    dist.all_reduce(buf, group=zopt.real_dp_process_group[i])
    return buf.view_as(p).cpu()


def _set_full(zopt, p: nn.Parameter, i: int, key: str | None, value: torch.Tensor) -> None:
    """Copy this rank's fragment of ``value`` into its partition of the master value or moment."""
    if _stage3(zopt):
        zopt.set_full_hp_param(value.to(torch.float32), p, key)
        return
    m = p._hp_mapping
    if m is not None:
        dst = _flat(zopt, p, i) if key is None else zopt.optimizer.state[_flat(zopt, p, i)][key]
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        dst.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))


def _hyper(zopt, p: nn.Parameter, i: int) -> dict:
    """The optimizer hyper-parameters of ``p``'s group (stage 3 keeps sub-groups of the user's groups)."""
    if _stage3(zopt):
        i = zopt.sub_group_to_group_id[zopt.grad_position[zopt.get_param_id(p)][0]]
    return {k: v for k, v in zopt.optimizer.param_groups[i].items() if k != "params"}


@torch.no_grad()
def state_dicts(engine) -> tuple[dict, dict]:
    """(model, optimizer) state of a DeepSpeed engine, assembled in the canonical layout (collective)."""
    zopt, module = _zero(engine), engine.engine.module
    _ensure_moments(zopt)
    by_id: dict[int, torch.Tensor] = {}
    osd: dict = {}
    for name, p, i in _params(zopt, module):
        by_id[id(p)] = _get_full(zopt, p, i, None)
        osd[f"state.{name}.step"] = zopt.optimizer.state[_flat(zopt, p, i)]["step"].detach().clone().float()
        for key in MOMENTS:
            osd[f"state.{name}.{key}"] = _get_full(zopt, p, i, key)
        osd.update({f"param_groups.{name}.{k}": v for k, v in _hyper(zopt, p, i).items()})
    msd = {k: by_id[id(v)] if isinstance(v, nn.Parameter) else v.detach().clone()
           for k, v in module.state_dict(keep_vars=True).items()}
    return msd, osd


@torch.no_grad()
def load_state_dicts(engine, msd: dict, osd: dict) -> None:
    """Put canonical (model, optimizer) state into a DeepSpeed engine: master values, moments, step counts, and the
    working copy of the parameters the forward pass uses (collective)."""
    import deepspeed

    zopt, module = _zero(engine), engine.engine.module
    _ensure_moments(zopt)
    stage3 = _stage3(zopt)
    for name, p, i in _params(zopt, module):
        _set_full(zopt, p, i, None, msd[name])
        for key in MOMENTS:
            _set_full(zopt, p, i, key, osd[f"state.{name}.{key}"])
        zopt.optimizer.state[_flat(zopt, p, i)]["step"] = osd[f"state.{name}.step"].detach().clone().float()
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=stage3):
            if not stage3 or dist.get_rank() == 0:  # stage 3 re-partitions rank 0's value after the block
                p.data.copy_(msd[name].to(p.dtype))
