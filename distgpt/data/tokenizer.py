"""Tokenizers: byte-level BPE trained on the user's corpus (HuggingFace ``tokenizers``), and a plain byte tokenizer.

Both map any UTF-8 text (English, Chinese, code) to ids and back without loss, and both save to one JSON file that
travels with the prepared data and with every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Protocol

EOT = "<|endoftext|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
"""Role markers of the chat template (``data/chat.py``): special tokens appended after the existing vocabulary."""


class Tokenizer(Protocol):
    """What the rest of distgpt needs of a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...
    @property
    def eot_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def to_json(self) -> str: ...
    def special_id(self, token: str) -> int | None: ...
    def with_specials(self, tokens: Sequence[str]) -> Tokenizer: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, an end-of-text token 256, then any special tokens (257, 258, …). No training;
    ideal for tiny runs."""

    kind = "byte"

    def __init__(self, specials: Sequence[str] = ()):
        self.specials = tuple(specials)

    @property
    def vocab_size(self) -> int:
        return 257 + len(self.specials)

    def special_id(self, token: str) -> int | None:
        """The id of a special token (None if this tokenizer has none by that name)."""
        if token == EOT:
            return 256
        return 257 + self.specials.index(token) if token in self.specials else None

    def with_specials(self, tokens: Sequence[str]) -> ByteTokenizer:
        """This tokenizer with ``tokens`` appended where missing; every existing id stays."""
        return ByteTokenizer(self.specials + tuple(t for t in tokens if self.special_id(t) is None))

    @property
    def eot_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # The end-of-text token has no bytes; invalid sequences (a split character) decode to U+FFFD.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"distgpt_tokenizer": "byte", **({"specials": list(self.specials)} if self.specials else {})})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by a ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, inner: object):
        self._tok = inner  # tokenizers.Tokenizer; typed loosely to keep the import lazy

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` up to ``vocab_size`` tokens (256 byte tokens + EOT + merges)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise ValueError(f"BPE vocab_size must be at least 258 (256 bytes + EOT + 1 merge), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable: no unknown tokens
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-side parallel batch encoding: much faster than a Python loop on large corpora.
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def special_id(self, token: str) -> int | None:
        """The id of a special token (None if this tokenizer has none by that name)."""
        return self._tok.token_to_id(token)

    def with_specials(self, tokens: Sequence[str]) -> BPETokenizer:
        """A copy with ``tokens`` appended as special tokens where missing; every existing id stays."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._tok.to_str())
        missing = [t for t in tokens if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return BPETokenizer(tok)

    def to_json(self) -> str:
        return self._tok.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from what ``to_json`` wrote."""
    data = json.loads(text)
    if data.get("distgpt_tokenizer") == "byte":
        return ByteTokenizer(data.get("specials", ()))
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text))


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of ``kind`` ('byte' or 'bpe'), trained on ``texts`` where training applies."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'byte'")
