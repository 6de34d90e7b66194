"""int8 inference weights, two ways, and their data-only form in an artifact.

``int8`` (weight-only, torchao's ``Int8WeightOnlyConfig``): each Linear weight int8 with one float scale per output
row (symmetric); activations stay in float, so the product dequantises the weights first. ``w8a8``: the same int8
weights and scales, and each Linear's input quantised to int8 per row at run time (absmax, symmetric), so the
product is int8 × int8 → int32 in torch's own ``torch._int_mm`` (oneDNN with VNNI on CPU) and reads a quarter of
fp32's bytes — on a CPU that is what decoding at batch 1 waits for (see ``W8A8Linear``).

In an artifact both write the int8 data and scales as plain safetensors entries (``NAME.weight.int8``,
``NAME.weight.scale``) and rebuild them on load (the artifact's ``inference.quantize`` says which) — exactly the same
numbers, no requantisation, and nothing is unpickled.
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


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 data, fp32 scale per row) of ``w``: symmetric, absmax / 127 per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127
    return torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale


class W8A8Linear(nn.Module):
    """A Linear with int8 weights (one scale per output row) whose input is quantised to int8 per row as it runs.

    Why: at batch 1 a CPU decode step streams every weight from memory once per token (a 15M-parameter model's 59 MB
    fp32 do not fit a 32 MB L3), and the Linears alone took 7.0 ms of a ~9 ms compiled step. Weight-only int8 does
    not help there (torch's ``_weight_int8pack_mm`` took 8.0 ms for the same products, dequantising first 17.9);
    int8 × int8 in ``torch._int_mm`` took 0.6–1.1 ms. Under torch.compile the input's quantisation and the output's
    rescaling fuse into the kernels around the product. ``qweight`` is kept (out, in), as stored; the product reads
    it transposed (measured no slower than a transposed copy)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> W8A8Linear:
        """The quantised form of ``lin`` (its weight rounded per row; its bias kept in fp32)."""
        q, scale = _int8_rows(lin.weight)
        return cls(q, scale, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (…, in) in float → (…, out) in fp32."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        xq, xs = _int8_rows(rows)
        y = torch._int_mm(xq, self.qweight.t()).float() * xs.unsqueeze(-1) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def quantize_w8a8(model: nn.Module) -> nn.Module:
    """Replace every Linear of ``model`` by a ``W8A8Linear`` in place (a tied LM head gets its own int8 copy; the
    embedding keeps its float weights); returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, W8A8Linear.from_linear(child))
        else:
            quantize_w8a8(child)
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
        elif isinstance(mod, W8A8Linear):
            out[name + INT8], out[name + SCALE] = mod.qweight.contiguous(), mod.scale.contiguous()
            quantised |= {name + ".qweight", name + ".scale"}
    for name, t in model.state_dict().items():
        if name not in quantised and not isinstance(t, tq.Int8Tensor):
            out[name] = t.detach().contiguous()
    return out


def unpack(model: nn.Module, tensors: dict[str, torch.Tensor], mode: str = "int8") -> list[str]:
    """Install the int8 weights of ``tensors`` into ``model``'s Linears (``mode`` int8: torchao weight-only tensors;
    w8a8: ``W8A8Linear`` modules); returns the keys it consumed."""
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
        if mode == "w8a8":
            parent, _, leaf = name.rpartition(".")
            setattr(modules[parent] if parent else model, leaf, W8A8Linear(q, scale, mod.bias))
        else:
            weight = tq.Int8Tensor(q, scale.float(), [1, q.shape[1]], torch.float32)
            mod.weight = nn.Parameter(weight, requires_grad=False)
        used += [name + INT8, name + SCALE]
    return used
