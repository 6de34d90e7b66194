"""Vocabulary extension into a new language: old ids and old-language tokenization kept, new text much shorter."""

from __future__ import annotations

import json

import pytest
import torch

from distgpt.checkpoint.export import load_model_dir, save_model_dir
from distgpt.cli import main
from distgpt.data.chat import chatterbot_files, read_conversations
from distgpt.data.extend import extend_bpe, tokens_per_char
from distgpt.data.prepare import documents
from distgpt.data.sources import expand_sources
from distgpt.data.tokenizer import BPETokenizer, ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    english = list(documents(expand_sources(["builtin:python-stdlib"]), "text", 1_500_000))
    chinese = [t for f in chatterbot_files("builtin:chatterbot/chinese") for c in read_conversations(f) for _, t in c]
    return {"en": english, "zh": chinese}


@pytest.fixture(scope="module")
def english_bpe(corpora) -> BPETokenizer:
    return BPETokenizer.train(corpora["en"], 1024)


def test_extension_keeps_old_ids_and_old_text_and_shortens_the_new_language(corpora, english_bpe):
    zh = corpora["zh"]
    learn, held = zh[: len(zh) * 4 // 5], zh[len(zh) * 4 // 5 :]
    new, added = extend_bpe(english_bpe, learn, 300)
    assert added == 300 and new.vocab_size == english_bpe.vocab_size + 300
    old_vocab = json.loads(english_bpe.to_json())["model"]["vocab"]
    new_vocab = json.loads(new.to_json())["model"]["vocab"]
    assert all(new_vocab[t] == i for t, i in old_vocab.items())  # every old token keeps its id
    sample = corpora["en"][:40]
    assert new.encode_batch(sample) == english_bpe.encode_batch(sample)  # English/code tokenizes as before
    before, after = tokens_per_char(english_bpe, held), tokens_per_char(new, held)
    assert after < 0.7 * before, (before, after)  # at least 30% fewer tokens per Chinese character (held out)
    assert all(new.decode(new.encode(t)) == t for t in held[:50])


def test_a_byte_tokenizer_cannot_be_extended():
    from distgpt.data.extend import ExtendError

    with pytest.raises(ExtendError, match="byte tokenizer has no merges"):
        extend_bpe(ByteTokenizer(), ["文"], 10)


def test_extend_command_writes_a_grown_model_with_old_rows_unchanged(corpora, english_bpe, tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=english_bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_model_dir(str(tmp_path / "en"), model, model.cfg, english_bpe)
    zh = tmp_path / "zh.txt"
    zh.write_text("\n\n".join(corpora["zh"]))
    assert main(["tokenizer", "extend", "--from", str(tmp_path / "en"), "--corpus", str(zh), "--add", "200",
                 "--out", str(tmp_path / "zh-model")]) == 0
    assert "added 200 tokens" in capsys.readouterr().out
    grown, tok, meta = load_model_dir(str(tmp_path / "zh-model"))
    assert tok.vocab_size == grown.cfg.vocab_size == english_bpe.vocab_size + 200 and meta["added"] == 200
    w = grown.tok_emb.weight.detach()
    torch.testing.assert_close(w[: english_bpe.vocab_size], model.tok_emb.weight.detach())
    torch.testing.assert_close(w[english_bpe.vocab_size :], model.tok_emb.weight.detach().mean(0).expand(200, -1))
