"""Reinforcement learning without Ray: the policy-gradient loss against a hand computation, advantages, the KL
term, the arithmetic task, rollout generation on a small model, version checks and the [rl] section's errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distgpt.config import load_job
from distgpt.config_schema import ConfigError
from distgpt.data.batch import Batch
from distgpt.rl import tasks
from distgpt.train.objectives.pg import PolicyGradient, group_advantages, k3

from ..conftest import REPO


def _batch(targets, mask, adv, ref=None, old=None) -> Batch:
    extras = {"advantages": torch.tensor(adv, dtype=torch.float32).view(-1, 1),
              "ref_logp": torch.zeros(len(targets), len(targets[0])) if ref is None else ref}
    if old is not None:
        extras["old_logp"] = old
    t = torch.tensor(targets)
    return Batch(t, t, loss_mask=torch.tensor(mask), extras=extras)


def test_pg_loss_and_gradient_match_a_hand_computation():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]], requires_grad=True)  # (B=1, T=2, V=3)
    batch = _batch([[0, 2]], [[True, True]], [2.0])
    obj = PolicyGradient(SimpleNamespace(kl_coef=0.0, clip_eps=0.2))
    loss = obj.loss(logits, batch)
    logp = torch.log_softmax(logits.detach(), -1)
    # ratio ≡ 1 on-policy: ℓ_t = −A per token, so the numerator is −A · (tokens)
    assert loss.item() == pytest.approx(-4.0)
    assert obj.normaliser(batch).item() == 2.0
    loss.backward()
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 2]]), 3).float()
    expected = -2.0 * (onehot - logp.exp())  # ∂(−A log softmax_y)/∂logits = −A (onehot − softmax)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_pg_masks_prompt_and_padding_positions_even_with_huge_kl():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, 0.0]])  # a pad position where the reference would blow up exp()
    batch = _batch([[1, 2, 3]], [[False, False, True]], [1.0], ref=ref)
    loss = PolicyGradient(SimpleNamespace(kl_coef=1.0, clip_eps=0.0)).loss(logits, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, :2].abs().sum() == 0


def test_kl_term_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    logp = torch.log_softmax(logits, -1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(k3(logp, logp), torch.zeros(2, 3))
    assert (k3(logp, logp - 0.5) > 0).all()
    d = -0.5
    assert k3(logp, logp + d)[0, 0].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5)
    with_kl = PolicyGradient(SimpleNamespace(kl_coef=0.5, clip_eps=0.2))
    without = PolicyGradient(SimpleNamespace(kl_coef=0.0, clip_eps=0.2))
    b = Batch(targets, targets, loss_mask=torch.ones(2, 3, dtype=torch.bool),
              extras={"advantages": torch.ones(2, 1), "ref_logp": logp})
    assert with_kl.loss(logits, b).item() == pytest.approx(without.loss(logits, b).item(), abs=1e-6)


def test_clip_stops_the_gradient_of_a_ratio_past_one_plus_eps():
    logits = torch.zeros(1, 1, 2, requires_grad=True)  # log π(0) = log 0.5
    old = torch.full((1, 1), math.log(0.5) - 0.5)  # ρ = e^0.5 ≈ 1.65 > 1.2
    batch = _batch([[0]], [[True]], [1.0], old=old)
    loss = PolicyGradient(SimpleNamespace(kl_coef=0.0, clip_eps=0.2)).loss(logits, batch)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logits.grad.abs().sum() == 0


def test_group_advantages_are_normalised_per_group():
    r = np.array([1, 0, 0, 0, 1, 1, 1, 1, 0.5, 0.2, 0.9, 0.1])
    a = group_advantages(r, 4, "grpo").reshape(3, 4)
    assert np.allclose(a[0].mean(), 0, atol=1e-6) and a[0].std() == pytest.approx(1, abs=1e-3)
    assert np.allclose(a[1], 0)  # all equal: nothing to learn from this prompt
    assert a[0, 0] > 0 > a[0, 1]
    b = group_advantages(r, 4, "reinforce")
    assert np.allclose(b, r - r.mean())
    with pytest.raises(ValueError):
        group_advantages(r[:5], 4)


def test_arithmetic_task_checks_exactly_and_keeps_held_out_problems_out_of_training():
    assert tasks.arithmetic_reward(["12+30=", "1+1=", "5+5="], ["42", "2\n", "10 "]) == [1.0, 1.0, 1.0]
    assert tasks.arithmetic_reward(["12+30=", "1+1="], ["43", "22"]) == [0.0, 0.0]
    held, train = set(tasks.arithmetic_problems("held_out")), set(tasks.arithmetic_problems("train"))
    assert len(held) == tasks.HELD_OUT and not held & train and len(held | train) == tasks.LIMIT ** 2
    text = open(tasks.arithmetic_text_file()).read()
    a, b = sorted(held)[0]
    assert f"\n{a}+{b}={a + b}\n" not in f"\n{text}" and text.count("\n") == len(train) * tasks.PASSES
    with pytest.raises(tasks.TaskError, match="not an 'a\\+b=' prompt"):
        tasks.arithmetic_reward(["hello"], ["1"])


def test_prompt_files(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "split": "held_out"}\n')
    assert tasks.load_prompts(str(f), "train") == ["a"] and tasks.load_prompts(str(f), "held_out") == ["b"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(tasks.TaskError, match="bad.jsonl:1"):
        tasks.load_prompts(str(tmp_path / "bad.jsonl"), "train")
    with pytest.raises(tasks.TaskError, match="cannot read"):
        tasks.load_prompts(str(tmp_path / "missing.txt"), "train")


def _rl_job(*over: str):
    return load_job(REPO / "jobs" / "rl.toml", list(over))


def test_rl_section_errors_name_the_fix():
    with pytest.raises(ConfigError) as e:
        _rl_job("--train.global_batch_size=100", "--init.from=", "--rl.group_size=1", "--rl.max_new_tokens=30")
    text = str(e.value)
    assert "prompts_per_step × rl.group_size" in text and "init.from" in text and "GRPO" in text
    assert "exceeds data.seq_len + 1" in text
    with pytest.raises(ConfigError, match="needs a reward function"):
        _rl_job("--rl.prompts=p.jsonl")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    """A randomly initialised model in the RL job's shape, saved as a model directory."""
    from distgpt.checkpoint.export import save_model_dir
    from distgpt.data.tokenizer import ByteTokenizer
    from distgpt.model.gpt import GPT

    job = _rl_job()
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("policy"))
    save_model_dir(out, GPT(job.gpt_config(257)), job.gpt_config(257), ByteTokenizer())
    return out


def test_generator_rows_logprobs_and_determinism(policy_dir):
    from distgpt.rl.generator import Generator

    job = _rl_job(f"--init.from={policy_dir}")
    g = Generator(policy_dir)
    prompts = ["12+3=", "7+77="]
    a = g.generate(prompts, 3, job.rl, job.seq_len + 1, seed=5)
    b = g.generate(prompts, 3, job.rl, job.seq_len + 1, seed=5)
    assert a.tokens.shape == (6, job.seq_len + 1) and np.array_equal(a.tokens, b.tokens)
    assert a.completions == b.completions
    for r in range(6):
        plen = len(prompts[r // 3])
        n = int(a.action[r].sum())
        assert 1 <= n <= job.rl.max_new_tokens and a.action[r, plen - 1 : plen - 1 + n].all()
        assert bytes(a.tokens[r, :plen].tolist()).decode() == prompts[r // 3]
    # policy = reference (same weights): the rollout's and the reference's log-probs agree, action tokens only
    assert np.allclose(a.logp, a.ref_logp, atol=1e-4) and (a.logp[~a.action] == 0).all()
    assert (a.logp[a.action] < 0).all()
    greedy = g.generate(prompts, 2, job.rl, job.seq_len + 1, seed=1, temperature=0.0)
    assert greedy.completions[0] == greedy.completions[1]


def test_generator_refuses_a_long_prompt(policy_dir):
    from distgpt.rl.generator import Generator

    job = _rl_job(f"--init.from={policy_dir}")
    with pytest.raises(ValueError, match="rl.max_prompt_tokens"):
        Generator(policy_dir).generate(["1234567+1="], 2, job.rl, job.seq_len + 1, seed=0)


def test_weights_round_trip_into_a_generator(policy_dir):
    from distgpt.orchestrator.weights import to_arrays
    from distgpt.rl.generator import Generator

    g = Generator(policy_dir)
    sd = {k: torch.zeros_like(v) for k, v in g.policy.state_dict().items()}
    sd = {k: v.to(torch.bfloat16) if v.dim() == 2 else v for k, v in sd.items()}
    arrays = to_arrays(sd)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays.values())
    g.load(arrays, 7)
    assert g.version == 7 and all((p == 0).all() for p in g.policy.parameters())
    with pytest.raises(ValueError, match="do not fit"):
        g.load({"nope": np.zeros(1, dtype=np.float32)}, 8)


def test_a_stale_batch_is_refused_then_regenerated(monkeypatch, policy_dir):
    from distgpt.orchestrator import rl_source
    from distgpt.orchestrator.rollout import RolloutBatch

    class Call:
        def __init__(self, fn):
            self.remote = fn

    versions = iter([3, 5, 3, 3])  # the first answer for step 5 comes from version 3

    def batch(step, cursor, fresh):
        cols = {"tokens": np.zeros((2, 17), np.int64), "action": np.zeros((2, 16), bool),
                "advantages": np.zeros(2, np.float32), "ref_logp": np.zeros((2, 16), np.float32)}
        return [RolloutBatch(step, next(versions), cursor, 0, cols)]

    coord = SimpleNamespace(batch=Call(batch), state=Call(lambda: {"reference": "r"}),
                            publish=Call(lambda v, box: 0.0))
    monkeypatch.setattr(rl_source, "find_actor", lambda name, timeout: coord)
    monkeypatch.setattr(rl_source.ray, "get", lambda x, timeout=None: x)
    monkeypatch.setattr(rl_source, "publish", lambda sd, v: SimpleNamespace(box=[None]))
    job = _rl_job(f"--init.from={policy_dir}", "--train.global_batch_size=2", "--rl.prompts_per_step=1",
                  "--rl.group_size=2")
    src = rl_source.RolloutSource(job, "c", rank=0)
    trainer = SimpleNamespace(step=5, mesh=SimpleNamespace(coords={"dp": 0}), shares=[2], full_state_dict=dict,
                              log=lambda s: None)
    src.bind(trainer)
    cols = src.next_columns()
    assert src.stale == 1 and src.last.version == 5 and cols["tokens"].shape == (2, 17)
    assert src.state_dict()["consumed"] == 1
    trainer.step = 6
    with pytest.raises(rl_source.StaleRollout, match="version 3, twice"):
        src.next_columns()
    with pytest.raises(Exception, match="reference model"):
        src.load_state_dict({"seed": 1, "consumed": 0, "reference": "other"})
