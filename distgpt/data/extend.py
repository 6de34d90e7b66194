"""Vocabulary extension for a new language: learn N tokens on its text and append them to an existing byte-level
BPE, without changing any existing token id or the tokenization of the old language.

How: train a fresh byte-level BPE on the new text, then walk its merges in order and keep those that (a) make a
token the old vocabulary lacks and (b) join two pieces made only of non-ASCII bytes (UTF-8 continuation and lead
bytes: Chinese, Cyrillic, accents …). Kept merges go after every old merge and their tokens after every old id. BPE
applies merges by rank, so old merges still act first everywhere; and since no kept merge touches an ASCII byte,
ASCII text (English, code) tokenizes exactly as before. Text of the new language gets far fewer tokens per character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from distgpt.data.tokenizer import BPETokenizer, Tokenizer
from distgpt.errors import DistgptError


class ExtendError(DistgptError, ValueError):
    """The tokenizer cannot be extended as asked."""


@lru_cache(maxsize=1)
def _ascii_chars() -> frozenset[str]:
    """The characters byte-level BPE uses for bytes 0–127 (GPT-2's byte-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return frozenset(table[b] for b in range(128))


def _non_ascii(piece: str) -> bool:
    return not (set(piece) & _ascii_chars())


def extend_bpe(tok: Tokenizer, texts: Iterable[str], add: int) -> tuple[BPETokenizer, int]:
    """(``tok`` with up to ``add`` tokens of the new language appended, how many were added)."""
    if not isinstance(tok, BPETokenizer):
        raise ExtendError("a byte tokenizer has no merges to extend — pre-train with data.tokenizer = 'bpe'")
    if add < 1:
        raise ExtendError(f"--add must be ≥ 1, got {add}")
    data = json.loads(tok.to_json())
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [list(m) if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    fresh = json.loads(BPETokenizer.train(list(texts), 257 + 3 * add).to_json())["model"]["merges"]
    next_id, added = tok.vocab_size, 0
    for m in fresh:
        a, b = m if isinstance(m, list) else m.split(" ")
        token = a + b
        if added == add or token in vocab or not (_non_ascii(a) and _non_ascii(b)) or a not in vocab or b not in vocab:
            continue
        vocab[token] = next_id
        merges.append([a, b])
        next_id, added = next_id + 1, added + 1
    model["merges"] = merges
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(json.dumps(data))), added


def tokens_per_char(tok: Tokenizer, texts: list[str]) -> float:
    """Mean tokens per character of ``texts`` (lower is better: more text per context, fewer steps per text)."""
    chars = sum(len(t) for t in texts)
    return sum(len(ids) for ids in tok.encode_batch(texts)) / max(1, chars)
