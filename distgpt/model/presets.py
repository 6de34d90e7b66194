"""Named model sizes and the arithmetic the planner needs: parameter counts, FLOPs per token, MFU.

Everything here is plain Python over ``GPTConfig`` (no torch), so ``distgpt plan`` stays fast and light.
"""

from __future__ import annotations

from dataclasses import replace

from distgpt.model.config import GPTConfig

# GPT-2 sizes follow Radford et al. (2019) with the 50257-token vocabulary; 1.3B / 6.7B / 13B follow the GPT-3 paper's
# table 2.1 (Brown et al., 2020: layers, d_model, heads at context 2048).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32),
    "small": GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=192),
    "gpt2-124m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-1.3b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=24, n_head=16, n_embd=2048),
    "6.7b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=32, n_head=32, n_embd=4096),
    "13b": GPTConfig(vocab_size=50257, block_size=2048, n_layer=40, n_head=40, n_embd=5120),
}


def preset(name: str, **overrides: object) -> GPTConfig:
    """A preset by name, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def layer_params(cfg: GPTConfig) -> int:
    """Parameters of one transformer block: 4 attention projections, 2 MLP projections, 2 LayerNorms."""
    c, f = cfg.n_embd, cfg.ffn_mult * cfg.n_embd
    b = 1 if cfg.bias else 0
    attn = 4 * c * c + 4 * c * b
    mlp = 2 * c * f + (f + c) * b
    norms = 2 * (c + c * b)
    return attn + mlp + norms


def embedding_params(cfg: GPTConfig) -> int:
    """Token embedding plus the learned position table (if any)."""
    pos = cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0
    return cfg.vocab_size * cfg.n_embd + pos


def head_params(cfg: GPTConfig) -> int:
    """Final LayerNorm plus the LM head's own weight (zero extra when tied to the embedding)."""
    norm = cfg.n_embd * (2 if cfg.bias else 1)
    return norm + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)


def param_count(cfg: GPTConfig) -> int:
    """Total distinct parameters (tied weights counted once). GPT-2 124M gives 124,439,808."""
    return embedding_params(cfg) + cfg.n_layer * layer_params(cfg) + head_params(cfg)


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters that take part in a matmul per token: all blocks plus the LM head (V·C, tied or not).

    Embedding and position lookups are gathers, not matmuls, so they add no FLOPs.
    """
    return cfg.n_layer * layer_params(cfg) + cfg.vocab_size * cfg.n_embd


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N for forward+backward matmuls plus the attention score/value term 12·L·C·T.

    As in PaLM (Chowdhery et al., 2022, appendix B): the attention term counts the full T×T product, as dense
    kernels do; N = ``matmul_params``.
    """
    t = seq_len or cfg.block_size
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * t


def mfu(tokens_per_s: float, cfg: GPTConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s (0..1)."""
    if peak_flops <= 0:
        return 0.0
    return tokens_per_s * flops_per_token(cfg, seq_len) / peak_flops
