"""Tokenizers round-trip any UTF-8 text, and survive saving."""

from __future__ import annotations

import pytest

from distgpt.data.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_json, train_tokenizer

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "机器学习是人工智能的一个分支。你好，世界！",
    "def f(x: int) -> int:\n\treturn x ** 2  # squared\n",
    "emoji 🚀 and accents: café, naïve, Ærøskøbing",
    "",
]
CORPUS = [s * 20 for s in SAMPLES if s] + ["平衡 " * 50, "for i in range(10):\n    print(i)\n" * 30]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok_round_trip_json(tok).encode(text) == tok.encode(text)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES + ["unseen: 龍 ∑ ß"])
def test_bpe_round_trip_including_chinese(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_saves(bpe):
    assert 258 < bpe.vocab_size <= 400
    text = CORPUS[1]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2  # merges compress text it was trained on
    again = tok_round_trip_json(bpe)
    assert again.encode(text) == bpe.encode(text) and again.eot_id == bpe.eot_id


def test_eot_is_a_single_reserved_token(bpe):
    assert bpe.eot_id not in bpe.encode(" ".join(SAMPLES))
    assert ByteTokenizer().eot_id == 256


def test_bad_kind_or_size():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer("wordpiece", [], 1000)
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer("bpe", ["x"], 100)


def tok_round_trip_json(tok):
    return tokenizer_from_json(tok.to_json())
