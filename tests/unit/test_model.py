"""The GPT: shapes, causality, parameter/FLOP arithmetic, stage pruning."""

from __future__ import annotations

import pytest
import torch

from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.model.presets import PRESETS, flops_per_token, mfu, param_count, preset
from distgpt.train.objectives.lm import lm_loss

ENCODINGS = ["learned", "sinusoidal", "rotary"]


def small_cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize("pos", ENCODINGS)
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_shapes_and_loss(pos, act):
    torch.manual_seed(0)
    model = GPT(small_cfg(pos_encoding=pos, activation=act))
    x = torch.randint(0, 97, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 97)
    loss = lm_loss(logits, torch.randint(0, 97, (3, 17)))
    # A freshly initialised model is close to uniform: loss on random targets ≈ ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


@pytest.mark.parametrize("pos", ENCODINGS)
def test_causality_future_tokens_never_change_earlier_logits(pos):
    torch.manual_seed(0)
    model = GPT(small_cfg(pos_encoding=pos)).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))  # rewrite the future
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])  # and the future did change something


def test_position_encodings_differ():
    torch.manual_seed(0)
    x = torch.randint(0, 97, (1, 10))
    outs = []
    for pos in ENCODINGS:
        torch.manual_seed(0)
        outs.append(GPT(small_cfg(pos_encoding=pos)).eval()(x))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"tie_embeddings": False}, {"pos_encoding": "rotary"}])
def test_param_count_matches_module(kw):
    cfg = small_cfg(**kw)
    model = GPT(cfg)
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert param_count(cfg) == sum(distinct.values())


def test_gpt2_124m_param_count_and_flops_by_hand():
    cfg = PRESETS["gpt2-124m"]
    # Hand count: wte 50257·768 + wpe 1024·768 + 12 × (4·768² + 4·768 + 2·768·3072 + 3072 + 768 + 4·768) + 2·768.
    layer = 4 * 768**2 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    assert param_count(cfg) == 50257 * 768 + 1024 * 768 + 12 * layer + 2 * 768 == 124_439_808
    # 6N over matmul parameters (blocks + LM head) + 12·L·C·T.
    expected = 6 * (12 * layer + 50257 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024) == expected
    # 1e5 tokens/s at this many FLOPs/token on a 989 TFLOP/s device.
    assert mfu(1e5, cfg, 1024, 989e12) == pytest.approx(1e5 * expected / 989e12)


@pytest.mark.parametrize("name,billions", [("gpt2-350m", 0.35), ("gpt2-1.3b", 1.3), ("6.7b", 6.7), ("13b", 13.0)])
def test_presets_are_their_advertised_size(name, billions):
    assert param_count(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=0.12)


def test_invalid_config_is_rejected_with_reason():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPT(small_cfg(n_head=5))
    with pytest.raises(KeyError, match="unknown model preset"):
        preset("gpt5")


def test_pipeline_stage_keeps_only_what_it_owns():
    """Removing embedding / blocks / head (as a pipeline stage does) composes back to the whole model."""
    torch.manual_seed(0)
    cfg = small_cfg(n_layer=4, tie_embeddings=False)
    full = GPT(cfg).eval()
    first, last = GPT(cfg).eval(), GPT(cfg).eval()
    first.load_state_dict(full.state_dict())
    last.load_state_dict(full.state_dict())
    for i in ("2", "3"):
        del first.layers[i]
    first.norm = first.lm_head = None
    for i in ("0", "1"):
        del last.layers[i]
    last.tok_emb = last.pos_emb = None
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(last(first(x)), full(x))


def test_block_size_is_enforced():
    model = GPT(small_cfg())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
