"""Objectives: the loss is normalised over the global batch, masked positions never count, and the engine computes
what the objective defines (the same loss whatever the micro-batch split)."""

from __future__ import annotations

import pytest
import torch

from distgpt.config_schema import ConfigError
from distgpt.data.batch import Batch
from distgpt.train.objectives import resolve
from distgpt.train.objectives.base import Objective, token_cross_entropy
from distgpt.train.objectives.lm import NextToken, lm_loss
from distgpt.train.trainer import Trainer

from ..conftest import tiny_job
from ..toy_objective import WeightedMasked

TOY = "--objective.kind=tests.toy_objective:WeightedMasked"


def test_lm_loss_is_the_sum_of_token_losses_and_the_normaliser_counts_them():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    batch = Batch(torch.zeros(2, 5, dtype=torch.long), targets)
    lm = NextToken()
    assert float(lm.normaliser(batch)) == 10.0
    torch.testing.assert_close(lm.loss(logits, batch) / lm.normaliser(batch), lm_loss(logits, targets))


def test_a_masked_target_never_changes_the_loss_and_weights_scale_it():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[True, False, True, True]])
    weights = torch.tensor([[1.0, 5.0, 2.0, 0.5]])
    obj = Objective()
    base = obj.loss(logits, Batch(targets, targets, mask, weights))
    changed = targets.clone()
    changed[0, 1] = 6  # the masked position's target
    assert float(obj.loss(logits, Batch(targets, changed, mask, weights))) == pytest.approx(float(base))
    changed[0, 2] = 6  # a counted position's target
    assert float(obj.loss(logits, Batch(targets, changed, mask, weights))) != pytest.approx(float(base))
    ell = token_cross_entropy(logits, targets)[0]
    assert float(base) == pytest.approx(float(ell[0] + 2 * ell[2] + 0.5 * ell[3]))
    assert float(obj.normaliser(Batch(targets, targets, mask, weights))) == 3.0


def test_batch_rows_select_every_column():
    b = Batch(torch.arange(12).view(4, 3), torch.arange(12).view(4, 3) + 1, torch.ones(4, 3, dtype=torch.bool),
              None, {"adv": torch.arange(4.0)})
    part = b.rows(torch.tensor([3, 1]))
    assert len(part) == 2 and part.inputs[:, 0].tolist() == [9, 3] and part.extras["adv"].tolist() == [3.0, 1.0]
    assert part.weights is None and part.loss_mask.shape == (2, 3)


def test_engine_trains_on_the_objective_over_the_global_batch(tiny_data, tmp_path):
    """Micro-batches of 2 and one of 8 hold different numbers of counted positions: equal losses mean the engine
    normalised by the whole batch, and the loss it reports is the toy's, not next-token cross-entropy."""
    def run(out, *over):
        return Trainer(tiny_job(tiny_data, str(tmp_path / out), "--train.max_steps=3", *over), log=lambda s: None)

    whole, split = run("a", TOY, "--plan.micro_batch_size=8"), run("b", TOY, "--plan.micro_batch_size=2")
    lm = run("c", "--plan.micro_batch_size=8")
    assert isinstance(whole.objective, WeightedMasked) and isinstance(lm.objective, NextToken)
    batch = whole.objective.make_batch({"tokens": whole.train_set.take(whole.loader.next_ids())})
    whole.loader.load_state_dict({"seed": whole.loader.seed, "consumed": 0})
    with torch.no_grad():
        obj = whole.objective
        expected = obj.loss(whole.engine.modules[0](batch.inputs), batch) / obj.normaliser(batch)
    a, b, c = whole.fit().losses, split.fit().losses, lm.fit().losses
    assert a[0] == pytest.approx(float(expected), rel=1e-6)
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5)
    assert abs(a[0] - c[0]) > 1e-3  # a different objective, not the built-in one


def test_objective_names_are_checked_at_load_and_resolved_with_a_clear_error():
    with pytest.raises(ConfigError, match="objective.kind: unknown objective 'sft2'"):
        from distgpt.config import load_job

        load_job(None, ["--objective.kind=sft2"])
    with pytest.raises(ConfigError, match="cannot load 'nope.nothing:X'"):
        resolve("nope.nothing:X")
    with pytest.raises(ConfigError, match="is not a subclass"):
        resolve("tests.toy_objective:Batch")
    assert isinstance(resolve("lm"), NextToken)
