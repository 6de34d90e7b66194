"""The model's typed configuration. Plain data: the planner reads it without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

PosEncoding = Literal["learned", "sinusoidal", "rotary"]
Activation = Literal["gelu", "relu"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape and behaviour of a decoder-only GPT."""

    vocab_size: int = 50304
    """Rows of the embedding / LM head. Jobs may leave it 0 to take the tokenizer's size."""
    block_size: int = 1024
    """Longest sequence (context window) the model is built for."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    ffn_mult: int = 4
    """Feed-forward hidden width as a multiple of n_embd."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings (0 for pre-training at scale)."""
    bias: bool = True
    """Bias terms in Linear and LayerNorm layers (GPT-2 has them)."""
    pos_encoding: PosEncoding = "learned"
    """Positional encoding: learned table (GPT-2), fixed sin/cos table (Vaswani et al.), or rotary (RoPE)."""
    activation: Activation = "gelu"
    """Feed-forward non-linearity."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the LM head (GPT-2 does; saves V*C parameters)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies (only with pos_encoding='rotary')."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def problems(self) -> list[str]:
        """Every inconsistency in this config, each as 'field: what is wrong — how to fix it'."""
        out: list[str] = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_mult"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            out.append(
                f"n_head: n_embd={self.n_embd} is not divisible by n_head={self.n_head} — "
                f"pick n_head among the divisors of n_embd"
            )
        elif self.pos_encoding == "rotary" and self.n_head >= 1 and self.head_dim % 2:
            out.append(f"pos_encoding: rotary needs an even head_dim, got {self.head_dim} — change n_head")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            out.append(f"pos_encoding: sinusoidal needs an even n_embd, got {self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (round-trips through from_dict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, ignoring nothing: unknown keys raise a KeyError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"unknown model config keys: {unknown}")
        return cls(**d)
