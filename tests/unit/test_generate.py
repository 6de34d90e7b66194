"""KV-cache decoding equals full recomputation; sampling controls; stop sequences; streaming of split characters."""

from __future__ import annotations

import pytest
import torch

from distgpt.data.tokenizer import ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.generate import SamplingConfig, filter_logits, generate_ids, generate_text
from distgpt.model.gpt import GPT


def model_for(pos: str, block: int = 48) -> GPT:
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=257, block_size=block, n_layer=2, n_head=2, n_embd=32, pos_encoding=pos)).eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
def test_cached_logits_equal_full_recompute(pos):
    model = model_for(pos)
    x = torch.randint(0, 257, (2, 30))
    full = model(x)
    caches = model.new_caches(2)
    parts = [model(x[:, :10], caches, 0)]  # prefill
    parts += [model(x[:, 10:17], caches, 10)]  # a chunk after a prefix (masked attention path)
    parts += [model(x[:, t : t + 1], caches, t) for t in range(17, 30)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_cached_generation_equals_uncached(pos):
    model = model_for(pos)
    greedy = SamplingConfig(max_new_tokens=25, temperature=0)
    prompt = [5, 17, 99, 3]
    assert list(generate_ids(model, prompt, greedy, use_cache=True)) == list(
        generate_ids(model, prompt, greedy, use_cache=False)
    )
    sampled = SamplingConfig(max_new_tokens=25, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert list(generate_ids(model, prompt, sampled, True)) == list(generate_ids(model, prompt, sampled, False))


def test_generation_past_the_block_keeps_going():
    model = model_for("rotary", block=16)
    out = list(generate_ids(model, [1, 2, 3], SamplingConfig(max_new_tokens=40, temperature=0)))
    assert len(out) == 40


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    # softmax ≈ [0.09, 0.67, 0.24, 0.03]: top_p=0.5 keeps only the largest; 0.8 keeps two.
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[True, False, False, True]]


def test_stop_sequence_ends_output_before_it():
    model, tok = model_for("learned"), ByteTokenizer()
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    full = "".join(generate_text(model, tok, "ab", cfg))
    assert len(full) >= 6
    stop = full[3:5]
    cut = "".join(generate_text(model, tok, "ab", cfg, stop=[stop]))
    assert cut == full[: full.index(stop)]



def test_streaming_never_splits_a_multibyte_character(monkeypatch):
    text = "你好, world"
    data = list(text.encode())
    monkeypatch.setattr("distgpt.model.generate.generate_ids", lambda m, p, c: iter(data))
    pieces = list(generate_text(None, ByteTokenizer(), "x", SamplingConfig()))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
