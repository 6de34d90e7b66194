"""A decoder-only GPT you can read top to bottom. No distributed code: parallelism is applied to it from outside.

Shapes: B batch, T sequence, C = n_embd, nh = local heads, hs = head_dim, V = vocab.
Blocks sit in a ``ModuleDict`` keyed by layer index, and ``tok_emb`` / ``pos_emb`` / ``norm`` / ``lm_head`` may be
``None``, so a pipeline stage keeps only what it owns (the first stage takes token ids, later ones hidden states).
Attention derives its head count from the projection's width, so a tensor-parallel shard (fewer columns) just works.
Packed rows (several documents per row) pass ``segments`` (B, T): attention stays inside each segment and positions
restart at each one, so a packed row computes exactly what its documents would alone.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from distgpt.model.config import GPTConfig


def initial_value(cfg: GPTConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of parameter ``name`` (its one-process name), a function of (seed, name) alone.

    GPT-2 init: N(0, 0.02) weights, zero biases, unit LayerNorm gains, residual projections scaled by
    1/sqrt(2·n_layer). Each weight draws from its own generator, seeded by the run's seed and the parameter's name,
    so any rank can make exactly the values of the parameters it owns — a pipeline stage, a tensor-parallel or FSDP
    shard — without building the rest, and the model is the same bit for bit whatever the Plan. A tied head is the
    embedding. Returned in fp32 on the CPU.
    """
    if cfg.tie_embeddings and name == "lm_head.weight":
        name = "tok_emb.weight"
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "fc2.weight")) else 0.02
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(.)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table


def rope_tables(n_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (n_pos, head_dim) for rotary embeddings in the 'rotate half' layout (GPT-NeoX)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv)  # (T, hs/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, hs)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position: x*cos + rotate_half(x)*sin, with cos/sin of shape (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def segment_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T) segment ids: each token's position inside its segment (B, T), and the attention mask (B, 1, T, T)
    that lets a query see the keys of its own segment up to itself (block-diagonal causal)."""
    b, t = segments.shape
    idx = torch.arange(t, device=segments.device).expand(b, t)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # start of each segment
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return idx - first, (same & causal).unsqueeze(1)


class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated to the model's block size."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions start..start+T; return all keys/values up to there."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_kernels(choice: str) -> contextlib.AbstractContextManager:
    """The SDPA kernels a job allows (``train.attention``): 'auto' leaves PyTorch's choice; 'flash' allows only
    kernels that never hold the T×T scores (flash, memory-efficient, cuDNN); 'math' only the explicit one."""
    if choice == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through PyTorch SDPA (flash / memory-efficient kernels where available).

    Separate q/k/v projections (not one fused QKV) so that a column split gives each tensor-parallel rank whole heads.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        c = cfg.n_embd
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(c, c, bias=cfg.bias)
        self.k_proj = nn.Linear(c, c, bias=cfg.bias)
        self.v_proj = nn.Linear(c, c, bias=cfg.bias)
        self.o_proj = nn.Linear(c, c, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rope``: (cos, sin) tables (T_max, hs) sliced from ``start_pos``, or already per token (B, 1, T, hs).
        ``mask``: (B, 1, T, T) bool, True where a query may see a key (packed segments); else causal."""
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism the projection holds only this rank's heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope if rope[0].dim() == 4 else (rope[0][start_pos : start_pos + t],
                                                        rope[1][start_pos : start_pos + t])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, nh, start_pos+T, hs)
        p = self.dropout if self.training else 0.0
        if mask is not None:  # packed segments: block-diagonal causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif cache is None or start_pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif t == 1:  # one new query may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # a chunk after a prefix: query i (absolute start_pos+i) sees keys 0..start_pos+i
            mask = torch.ones(t, start_pos + t, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, nh*hs)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: C → ffn_mult·C → C."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.ffn_mult * cfg.n_embd, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_mult * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        # tanh-approximate GELU as in GPT-2.
        self.act: nn.Module = nn.GELU(approximate="tanh") if cfg.activation == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, start_pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, cache, start_pos, mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Token embedding (+ positions) → blocks → final LayerNorm → LM head. ``forward`` returns logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))
        self.cfg = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb: nn.Embedding | None = (
            nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        )
        # Fixed tables are buffers, not state: rebuilt from the config, never checkpointed.
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        if cfg.pos_encoding == "rotary":
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not self.lm_head.weight.is_meta:  # built on the meta device: the caller initialises what it keeps
            self.init_weights(torch.initial_seed())

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Every parameter this module holds set to ``initial_value`` under its own name."""
        for name, p in self.named_parameters():
            p.copy_(initial_value(self.cfg, name, tuple(p.shape), seed))

    def reset_buffers(self) -> None:
        """Recompute the fixed position tables (after ``to_empty`` left them uninitialised)."""
        cfg = self.cfg
        device = next(self.parameters()).device
        if cfg.pos_encoding == "sinusoidal":
            self.pos_table = sinusoidal_table(cfg.block_size, cfg.n_embd).to(device)
        if cfg.pos_encoding == "rotary":
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_base)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def new_caches(self, batch: int, dtype: torch.dtype | None = None) -> dict[str, KVCache]:
        """Empty KV caches, one per layer this module holds."""
        ref = next(self.parameters())
        n_local = self.layers[next(iter(self.layers))].attn.q_proj.weight.shape[0] // self.cfg.head_dim
        return {
            i: KVCache(batch, n_local, self.cfg.block_size, self.cfg.head_dim, dtype or ref.dtype, ref.device)
            for i in self.layers
        }

    def embed(self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids → (B, T, C) input of the first block (``positions``: (B, T) per-token positions)."""
        assert self.tok_emb is not None, "this stage holds no embedding"
        t = tokens.shape[1]
        if start_pos + t > self.cfg.block_size:
            raise ValueError(f"sequence of {start_pos + t} tokens exceeds block_size {self.cfg.block_size}")
        h = self.tok_emb(tokens)
        pos = positions if positions is not None else torch.arange(start_pos, start_pos + t, device=tokens.device)
        if self.pos_emb is not None:
            h = h + self.pos_emb(pos)
        elif self.cfg.pos_encoding == "sinusoidal":
            h = h + self.pos_table[pos].to(h.dtype)
        return self.drop(h)

    def forward(
        self,
        x: torch.Tensor,
        caches: dict[str, KVCache] | None = None,
        start_pos: int = 0,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) — or hidden states (B, T, C) on a later pipeline stage — to logits (B, T, V),
        or to hidden states when this stage has no LM head. ``segments`` (B, T): packed documents (module doc)."""
        positions = mask = None
        if segments is not None:
            positions, mask = segment_layout(segments)
        h = self.embed(x, start_pos, positions) if self.tok_emb is not None else x
        rope = (self.rope_cos, self.rope_sin) if self.cfg.pos_encoding == "rotary" else None
        if rope is not None and positions is not None:
            rope = (rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1))  # (B, 1, T, hs)
        for i, block in self.layers.items():
            h = block(h, rope, caches[i] if caches is not None else None, start_pos, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

