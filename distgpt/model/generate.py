"""Autoregressive generation with a KV cache: sampling controls, stop sequences, streaming text."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from distgpt.model.gpt import GPT


class TextCodec(Protocol):
    """What generation needs of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 200
    """Tokens to generate at most."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p (1.0: off)."""
    seed: int | None = None
    """Seed for the sampler's own generator (None: nondeterministic)."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Pick the next token (B, 1) from last-position logits (B, V)."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)


@torch.no_grad()
def generate_ids(
    model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time. With ``use_cache`` each step feeds one token through cached keys/values.

    When the context fills the block, the cache is rebuilt from the last half-block of tokens (positions restart),
    so long generations keep going at the cost of one prefill per half-block.
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; give at least one character")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    block = model.cfg.block_size
    ids = list(prompt[-block:])
    caches, pos = None, 0
    logits = None
    for _ in range(cfg.max_new_tokens):
        if not use_cache:
            window = torch.tensor([ids[-block:]], device=device)
            logits = model(window)[:, -1]
        elif caches is None or pos >= block:
            keep = ids[-(block // 2) :] if caches is not None else ids
            caches = model.new_caches(1)
            logits = model(torch.tensor([keep], device=device), caches, 0)[:, -1]
            pos = len(keep)
        nxt = sample_next(logits, cfg, gen)
        tok = int(nxt.item())
        ids.append(tok)
        yield tok
        if use_cache and pos < block:  # a full block is rebuilt at the top of the next step instead
            logits = model(nxt.view(1, 1), caches, pos)[:, -1]
            pos += 1


def generate_text(
    model: GPT,
    codec: TextCodec,
    prompt: str,
    cfg: SamplingConfig,
    stop: Sequence[str] = (),
    prompt_ids: Sequence[int] | None = None,
    stop_ids: Collection[int] = (),
) -> Iterator[str]:
    """Stream decoded text after ``prompt``; stop at (and exclude) the first stop sequence or ``stop_ids`` token.
    ``prompt_ids`` replaces the encoded prompt (a chat template's markers are token ids, not text)."""
    ids = list(prompt_ids) if prompt_ids is not None else codec.encode(prompt)
    return stream_text(codec, generate_ids(model, ids, cfg), stop, stop_ids)


class IncrementalText:
    """Token ids in, final text out: ``feed`` returns the text that became final with this token, ``flush`` the
    rest. Byte-level tokens may split a UTF-8 character, so text is released only once it decodes cleanly, and
    enough of it is held back to recognise a stop sequence that straddles two tokens. After a stop sequence or a
    ``stop_ids`` token, ``stopped`` is True and nothing more is released."""

    def __init__(self, codec: TextCodec, stop: Sequence[str] = (), stop_ids: Collection[int] = ()):
        self.codec, self.stop, self.stop_ids = codec, list(stop), set(stop_ids)
        self.hold = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, tok: int) -> str:
        """The text that ``tok`` makes final (often '', sometimes several characters)."""
        if self.stopped:
            return ""
        if tok in self.stop_ids:
            out = self.flush()
            self.stopped = True
            return out
        self.ids.append(tok)
        self.text = self.codec.decode(self.ids)
        hits = [h for h in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if h >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            out = self.flush()
            self.stopped = True
            return out
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def flush(self) -> str:
        """Whatever is held back (at the end of generation)."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return "" if self.stopped else out


def stream_text(codec: TextCodec, tokens: Iterable[int], stop: Sequence[str] = (),
                stop_ids: Collection[int] = ()) -> Iterator[str]:
    """Decoded text of ``tokens`` as it becomes final (``IncrementalText``), ending before the first stop sequence
    or ``stop_ids`` token (the caller stops the token source when this ends early)."""
    text = IncrementalText(codec, stop, stop_ids)
    for tok in tokens:
        piece = text.feed(tok)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.flush()
    if piece:
        yield piece
