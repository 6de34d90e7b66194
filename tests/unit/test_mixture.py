"""data.mix: fixed shares of every global batch from other prepared datasets — a pure function of the position,
the same rows whatever the data-parallel split, each part's samples in its own order, a validation loss per part."""

from __future__ import annotations

import json

import pytest
import torch

from distgpt.config import load_job
from distgpt.config_schema import ConfigError
from distgpt.data.loader import DataLoader, DatasetError, TokenDataset
from distgpt.data.mixture import Mixture
from distgpt.data.prepare import PrepareSpec, prepare
from distgpt.train.trainer import Trainer

from ..conftest import tiny_job


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> str:
    """Chinese text (chatterbot's YAML files read as plain text), byte tokens, seq_len 64 like tiny_data."""
    out = str(tmp_path_factory.mktemp("zh"))
    prepare(PrepareSpec(("builtin:chatterbot/chinese",), out, "byte", 0, 64, 0.1), progress=lambda s: None)
    return out


def test_every_global_batch_holds_the_shares_and_each_part_its_own_order(tiny_data, other_data):
    main, replay = TokenDataset(other_data), TokenDataset(tiny_data)
    mix = Mixture(main, [(replay, 0.25)], 8)
    assert mix.counts() == [2, 6]
    seen = []
    for step in range(5):
        rows = mix.rows(seed=3, start=8 * step, count=8)["tokens"]
        seen.append(rows[:2])
        torch.testing.assert_close(rows[2:], main.rows(3 + 2, 6 * step, 6)["tokens"])  # the job's own, its order
    # the replay part: its own first 10 samples in its own order (seed + its index + 1), none repeated
    torch.testing.assert_close(torch.cat(seen), replay.rows(3 + 1, 0, 10)["tokens"])


def test_a_data_parallel_split_serves_the_same_rows(tiny_data, other_data):
    main, replay = TokenDataset(other_data), TokenDataset(tiny_data)
    one = DataLoader(Mixture(main, [(replay, 0.25)], 8), 8, 5)
    two = [DataLoader(Mixture(main, [(replay, 0.25)], 8), 8, 5, r, [3, 5]) for r in range(2)]
    for _ in range(3):
        whole = one.next_columns()["tokens"]
        torch.testing.assert_close(torch.cat([ld.next_columns()["tokens"] for ld in two]), whole)


def test_bad_shares_are_refused(tiny_data, other_data):
    with pytest.raises(ConfigError, match="data.mix: shares"):
        load_job(None, ["--data.mix={'a' = 1.5}"])
    with pytest.raises(DatasetError, match="each mixed-in dataset ≥ 1 sample"):
        Mixture(TokenDataset(other_data), [(TokenDataset(tiny_data), 0.01)], 8)


def test_training_on_a_mixture_reports_a_validation_loss_per_dataset(tiny_data, other_data, tmp_path):
    job = tiny_job(tiny_data, str(tmp_path), f"--data.prepared={other_data}", f"--data.mix={{'{tiny_data}' = 0.25}}",
                   "--train.max_steps=4", "--train.eval_interval=2")
    res = Trainer(job, log=lambda s: None).fit()
    assert set(res.val_losses) == {2, 4} and set(res.mix_val_losses[tiny_data]) == {2, 4}
    assert res.mix_val_losses[tiny_data][4] != res.val_losses[4]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("kind") == "val" and r.get("source") == tiny_data] == [2, 4]
