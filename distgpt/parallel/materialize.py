"""Initialisation without materialising the whole model: a rank builds the GPT on the meta device, keeps its part
(pipeline stage, tensor-parallel shard, FSDP2 shard), and only then gives that part storage and values.

Each parameter's value comes from ``initial_value`` under its one-process name, a function of the run's seed and
that name alone, so a shard is filled with exactly the elements a one-process initialisation gives — the full model
is the same bit for bit whatever the Plan. A sharded parameter's full value is made on the host one tensor at a time
and the rank keeps its slice (``distribute_tensor`` with ``src_data_rank=None`` slices locally, no communication):
the host's peak is the largest single tensor, not the model. Trained weights (``init.from``) take the same path:
``init`` is then a ``WeightSource`` that hands over one full tensor at a time, by one-process name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from distgpt.model.gpt import GPT, initial_value


class WeightSource(Protocol):
    """Trained weights, one tensor at a time (``train/init.py`` reads them from a model directory)."""

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The full value of the one-process parameter ``name``, of ``shape``."""
        ...


class ShardedSource(Protocol):
    """Trained weights that load straight into a module's own (sharded) parameters: a checkpoint's reader fetches
    only the slices this rank holds."""

    def fill(self, module: nn.Module) -> None:
        """Give ``module``'s parameters (storage allocated, one-process names after ``one_process_name``) their
        trained values. Collective where a process group exists: every rank calls it equally often."""
        ...


Init = int | WeightSource | ShardedSource
"""What a meta-device model's values are: a run seed (a fresh initialisation) or trained weights."""

WRAPPERS = ("_checkpoint_wrapped_module.", "module.")
"""Name parts wrappers insert (activation recomputation, DDP); FSDP2 and DTensor TP keep names."""


def is_meta(module: nn.Module) -> bool:
    """Whether ``module``'s parameters have no storage yet (built under ``torch.device('meta')``)."""
    return any(p.is_meta for p in module.parameters())


def one_process_name(name: str) -> str:
    """The name a one-process GPT gives this parameter (layer keys are global indices already)."""
    for part in WRAPPERS:
        name = name.replace(part, "")
    return name


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, init: Init) -> nn.Module:
    """Storage on ``device`` for the parameters ``module`` holds, filled with their one-process values — a fresh
    initialisation with seed ``init``, or trained weights — (for a DTensor, only this rank's shard); position
    tables recomputed."""
    shared = _shared_names(module)
    module.to_empty(device=device)
    _retie(module, shared)
    gpts = [m for m in module.modules() if isinstance(m, GPT)]
    cfg = gpts[0].cfg
    if hasattr(init, "fill"):
        init.fill(module)
    else:
        _fill(module, cfg, device, init)
    for gpt in gpts:
        gpt.reset_buffers()
    return module


def _fill(module: nn.Module, cfg, device: torch.device, init: int | WeightSource) -> None:
    """Each parameter's full one-process value, made one at a time; a DTensor keeps its own slice of it."""
    for name, p in module.named_parameters():
        key, shape = one_process_name(name), tuple(p.shape)
        full = initial_value(cfg, key, shape, init) if isinstance(init, int) else init.tensor(key, shape)
        if isinstance(p, DTensor):
            shard = distribute_tensor(full.to(device), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(full)


def _shared_names(module: nn.Module) -> list[list[str]]:
    """Groups of names under which one Parameter appears (a tied head)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, shared: list[list[str]]) -> None:
    """Make each group one Parameter again: ``to_empty`` gives every module its own new tensor (FSDP2 and
    ``replicate`` keep their shared parameters shared; plain modules do not)."""
    for first, *rest in shared:
        keep = module.get_parameter(first)
        for name in rest:
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner)
            if getattr(sub, attr) is not keep:
                setattr(sub, attr, keep)


@torch.no_grad()
def materialize_partitioned(module: nn.Module, device: torch.device, init: int | WeightSource,
                            partition: Callable[[nn.Module], None]) -> nn.Module:
    """A meta-device module made real one module's parameters at a time, each handed to ``partition`` (DeepSpeed's
    ``zero.Init``: this rank keeps its ZeRO-3 partition, the rest is freed) before the next are made — so the host
    holds one module's full tensors at a time, never the model. Children go before their parent (a parent's
    ``partition`` then finds its children's parameters partitioned already); a tied head is made once."""
    gpts = [m for m in module.modules() if isinstance(m, GPT)]
    cfg = gpts[0].cfg
    made: dict[int, nn.Parameter] = {}  # meta parameter → its real one (a tied parameter appears twice)
    for prefix, sub in reversed(list(module.named_modules())):
        direct = list(sub._parameters.items())
        if not any(p is not None and p.is_meta for _, p in direct):
            continue
        for attr, p in direct:
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                key, shape = one_process_name(f"{prefix}.{attr}" if prefix else attr), tuple(p.shape)
                full = initial_value(cfg, key, shape, init) if isinstance(init, int) else init.tensor(key, shape)
                made[id(p)] = nn.Parameter(full.to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
            sub._parameters[attr] = made[id(p)]
        partition(sub)
    for sub in module.modules():
        for name, b in sub._buffers.items():
            if b is not None and b.is_meta:
                sub._buffers[name] = torch.empty_like(b, device=device)
    for gpt in gpts:
        gpt.reset_buffers()
    return module
