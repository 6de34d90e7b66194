"""AdamW with the usual no-decay groups (the engines build it over the parameters each rank holds)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases and embeddings do not (decaying them only hurts)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A pipeline's last stage holds a tied head without the embedding: it is still an embedding.
    tied = any(getattr(getattr(m, "cfg", None), "tie_embeddings", False) for m in model.modules())
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        is_embedding = id(p) in embeddings or (tied and name.endswith("lm_head.weight"))
        dims = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter keeps its shape there
        (no_decay if dims < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused / foreach kernels are chosen by PyTorch for the device."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
