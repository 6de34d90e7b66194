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


@pytest.mark.parametrize("pos", ENCODINGS)
def test_every_position_encoding_sees_word_order(pos):
    """Without position information one causal attention layer is blind to order: the last token's logits are the
    same for any reordering of what precedes it (attention sums over a set). Each encoding must break that. The
    blind baseline is checked too, so the test cannot pass by accident."""
    a, b = torch.tensor([[3, 7, 11, 2, 5]]), torch.tensor([[11, 2, 7, 3, 5]])  # same tokens before the last, reordered
    torch.manual_seed(0)
    blind = GPT(small_cfg(pos_encoding="learned", n_layer=1)).eval()
    torch.nn.init.zeros_(blind.pos_emb.weight)
    assert (blind(a)[0, -1] - blind(b)[0, -1]).abs().max() < 2e-7  # float rounding only
    torch.manual_seed(0)
    model = GPT(small_cfg(pos_encoding=pos, n_layer=1)).eval()
    # At initialisation attention is nearly uniform, so the effect is small (sinusoidal ≈ 2e-5, learned ≈ 8e-3);
    # 1e-6 is still five times float rounding.
    assert (model(a)[0, -1] - model(b)[0, -1]).abs().max() > 1e-6


def test_rotary_scores_depend_only_on_relative_position():
    """q·k after rotary depends on m − n alone: the same pair shifted by s scores the same, another gap does not."""
    from distgpt.model.gpt import apply_rope, rope_tables

    cos, sin = rope_tables(64, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    for s in (1, 7, 40):
        torch.testing.assert_close(score(9, 3), score(9 + s, 3 + s), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(9, 3), score(9, 4))


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


def test_train_attention_math_stores_the_scores_and_flash_does_not():
    """``train.attention`` really picks the kernel: the explicit one saves the T×T scores for backward."""
    from distgpt.model.gpt import attention_kernels

    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 128))

    def saved(choice: str) -> tuple[int, torch.Tensor]:
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with attention_kernels(choice), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        return sum(sizes.values()), y

    (math_b, y_math), (flash_b, y_flash) = saved("math"), saved("flash")
    scores = 2 * 2 * 128 * 128 * 4  # batch × heads × T × T fp32 probabilities
    lse = 2 * 2 * 128 * 4  # what the flash kernel keeps instead: one log-sum-exp per query
    assert math_b - flash_b == scores - lse
    torch.testing.assert_close(y_math, y_flash, rtol=1e-4, atol=1e-5)
