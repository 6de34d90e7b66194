"""Weight-only int8 quantisation through torchao, and its data-only form in an artifact.

torchao's ``Int8WeightOnlyConfig`` stores each Linear weight as int8 with one float scale per output row (symmetric);
activations stay in float. In an artifact the int8 data and scales are written as plain safetensors entries
(``NAME.weight.int8``, ``NAME.weight.scale``) and rebuilt into torchao tensors on load — exactly the same numbers,
no requantisation, and nothing is unpickled.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

INT8, SCALE = ".weight.int8", ".weight.scale"


def _torchao():
    # torchao logs a failed load of its CUDA-only kernels on CPU machines; that is expected here, not news.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # …and torch notes, per compile, that torchao's enum and tensor types could be registered better: not actionable.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching.*")
    import torchao.quantization as tq

    return tq


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise every Linear weight of ``model`` to int8 in place (torchao weight-only int8); returns the model."""
    tq = _torchao()
    tq.quantize_(model, tq.Int8WeightOnlyConfig())
    return model


def pack(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors of a (possibly quantised) model: int8 data and scales for quantised Linears, the rest as is."""
    tq = _torchao()
    out: dict[str, torch.Tensor] = {}
    quantised = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and isinstance(mod.weight, tq.Int8Tensor):
            out[name + INT8] = mod.weight.qdata.contiguous()
            out[name + SCALE] = mod.weight.scale.contiguous()
            quantised.add(name + ".weight")
    for name, t in model.state_dict().items():
        if name not in quantised and not isinstance(t, tq.Int8Tensor):
            out[name] = t.detach().contiguous()
    return out


def unpack(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Install the int8 weights of ``tensors`` into ``model``'s Linears; returns the keys it consumed."""
    names = sorted(k[: -len(INT8)] for k in tensors if k.endswith(INT8))
    if not names:
        return []
    tq = _torchao()
    modules = dict(model.named_modules())
    used = []
    for name in names:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear) or name + SCALE not in tensors:
            raise ValueError(f"int8 weights for {name!r} match no Linear layer of the model (or lack their scale)")
        q, scale = tensors[name + INT8], tensors[name + SCALE]
        if q.dtype != torch.int8 or tuple(q.shape) != tuple(mod.weight.shape):
            raise ValueError(f"{name}: int8 weights of shape {tuple(q.shape)}/{q.dtype}, the layer needs "
                             f"{tuple(mod.weight.shape)}/int8")
        weight = tq.Int8Tensor(q, scale.float(), [1, q.shape[1]], torch.float32)
        mod.weight = nn.Parameter(weight, requires_grad=False)
        used += [name + INT8, name + SCALE]
    return used
