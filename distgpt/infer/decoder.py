"""The inference form of a GPT: a static, preallocated KV cache and two fixed-shape steps, prefill and decode.

``GPT.forward`` grows its cache slice by one position per token, so every step has a new shape — fine eagerly, a
recompile per token under ``torch.compile``. Here the cache is one buffer per layer of shape
(slots, heads, block_size + 1, head_dim), allocated once and written in place. A decode step reads a span of it (the
positions reached, rounded up) and masks the positions a row has not reached, so nothing about it changes from token
to token but the span, which the runner compiles as a symbolic size: one graph serves every token (gpt-fast's
approach, with the span added so a short context does not pay for the whole block).

Each *slot* is one cache row, owned by one request. Rows sit at different positions (``pos`` per row), which is what
lets a new request join a running batch at the next decode step (iteration-level batching, ``infer.batcher``).
The decoder reuses the GPT's own modules (embedding, projections, norms, head): it adds a cache layout, not weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgpt.model.gpt import GPT, apply_rope


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d, masked) · v for one query per row. Written out rather than through SDPA: one query against
    a whole block is a matrix-vector product, which the compiler fuses with the mask and softmax into a couple of
    kernels, while SDPA's CPU flash kernel pays its tiling overhead for a single row (measured: ~20% of a decode
    step of a 10M-parameter model)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


class StaticDecoder(nn.Module):
    """Prefill one slot, or decode one token for rows 0..n-1, against a preallocated cache (call under
    ``torch.no_grad()``, as ``infer.runner.Runner`` does).

    ``slots``: cache rows (the largest batch); ``dtype``: the cache's dtype (the model's by default).
    """

    def __init__(self, model: GPT, slots: int, dtype: torch.dtype | None = None):
        super().__init__()
        if model.tok_emb is None or model.lm_head is None or model.norm is None:
            raise ValueError("StaticDecoder needs a whole model (embedding, blocks, final norm and LM head)")
        self.model = model.eval()
        cfg = model.cfg
        self.slots, self.block_size = slots, cfg.block_size
        ref = next(model.parameters())
        heads = cfg.n_head
        # One spare position: a key span then never covers the whole buffer, so the sliced cache's strides never
        # equal a contiguous tensor's — which the compiler's matmul guards on (a span reaching block_size
        # recompiled the decode step once).
        shape = (slots, heads, cfg.block_size + 1, cfg.head_dim)
        # One buffer per layer, not one stacked tensor: writing into a view of a shared buffer makes the compiler
        # copy the whole buffer every step (functionalisation), a write into a buffer of its own happens in place.
        # Persistent=False: the cache is scratch space, never part of a state dict or an artifact.
        for i in range(cfg.n_layer):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype or ref.dtype, device=ref.device),
                                 persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype or ref.dtype, device=ref.device),
                                 persistent=False)
        self.register_buffer("positions", torch.arange(cfg.block_size, device=ref.device), persistent=False)
        # Slot numbers apart from positions: a batch may hold more rows than the block has positions (rollouts).
        self.register_buffer("slot_ids", torch.arange(slots, device=ref.device), persistent=False)

    def cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value cache of one layer, (slots, heads, block_size, head_dim) each."""
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def _qkv(self, attn: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, nh, T, hs) of ``x`` (B, T, C) at positions ``pos`` (B, T), rotated when the model uses RoPE."""
        b, t, _ = x.shape
        hs = self.model.cfg.head_dim
        q = attn.q_proj(x).view(b, t, -1, hs).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, hs).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, hs).transpose(1, 2)
        if self.model.cfg.pos_encoding == "rotary":
            cos, sin = self.model.rope_cos[pos].unsqueeze(1), self.model.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hs)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.norm(h)).float()

    def prefill(self, tokens: torch.Tensor, slot: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Fill cache row ``slot`` (0-d) from ``tokens`` (1, T) — the prompt right-padded to a bucket length — and
        return the logits (1, V) after its first ``length`` (0-d) tokens. Padding is written to the cache too, but
        a row only ever attends to positions it has reached, and decoding overwrites them in order."""
        t = tokens.shape[1]
        pos = self.positions[:t].unsqueeze(0)
        h = self.model.embed(tokens, positions=pos)
        for i, block in enumerate(self.model.layers.values()):
            q, k, v = self._qkv(block.attn, block.ln1(h), pos)
            # A one-element index tensor, not a 0-d one: indexing with a 0-d tensor reads it back as a Python int
            # (a device sync, and a graph break under torch.compile).
            kc, vc = self.cache(i)
            kc[slot.view(1), :, :t] = k
            vc[slot.view(1), :, :t] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + block.attn.o_proj(y.transpose(1, 2).reshape(1, t, -1))
            h = h + block.mlp(block.ln2(h))
        last = h.index_select(1, (length - 1).view(1))  # (1, 1, C): only the position we sample from
        return self._head(last)[:, 0]

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One token per row for rows 0..n-1: ``tokens`` (n,) at positions ``pos`` (n,) → next-token logits (n, V).
        ``keys`` is ``positions[:span]`` for a span past every row's position: attention reads only that much of
        the cache (at 8 rows the whole block's keys and values outweighed the weights). Rows that hold no request
        may take any token and position below the span; their output is ignored."""
        n, span = tokens.shape[0], keys.shape[0]
        rows = self.slot_ids[:n]  # 0..n-1 (the cache's first n slots)
        h = self.model.embed(tokens.view(n, 1), positions=pos.view(n, 1))
        visible = (keys.view(1, -1) <= pos.view(n, 1)).view(n, 1, 1, span)
        for i, block in enumerate(self.model.layers.values()):
            q, k, v = self._qkv(block.attn, block.ln1(h), pos.view(n, 1))
            kc, vc = self.cache(i)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            y = masked_attention(q, kc[:n, :, :span], vc[:n, :, :span], visible)
            h = h + block.attn.o_proj(y.transpose(1, 2).reshape(n, 1, -1))
            h = h + block.mlp(block.ln2(h))
        return self._head(h)[:, 0]
