"""The Plan: rank order, layer ranges, shares, JSON round trip, and one clear error per problem."""

from __future__ import annotations

import pytest

from distgpt.config import load_job
from distgpt.config_schema import ConfigError
from distgpt.model.presets import preset
from distgpt.planner.plan import Plan, PlanError

from ..conftest import REPO

MODEL = preset("tiny", n_layer=4, n_head=4, vocab_size=264)


def test_rank_order_tp_fastest():
    plan = Plan(dp=2, tp=2, pp=2, rank_order="tp-dp-pp")
    assert [plan.coords(r) for r in (0, 1, 2, 4)] == [
        {"tp": 0, "dp": 0, "pp": 0}, {"tp": 1, "dp": 0, "pp": 0}, {"tp": 0, "dp": 1, "pp": 0},
        {"tp": 0, "dp": 0, "pp": 1}]
    assert all(plan.rank_of(**plan.coords(r)) == r for r in range(8))
    other = Plan(dp=2, tp=2, pp=2, rank_order="dp-tp-pp")
    assert other.coords(1) == {"dp": 1, "tp": 0, "pp": 0}


def test_layer_ranges_even_uneven_and_interleaved():
    assert Plan(pp=2).layer_ranges(4) == [(0, 2), (2, 4)]
    assert Plan(pp=3).layer_ranges(4) == [(0, 2), (2, 3), (3, 4)]
    assert Plan(pp=2, stage_layers=(3, 1)).layer_ranges(4) == [(0, 3), (3, 4)]
    assert Plan(pp=2, virtual_stages=2, schedule="interleaved-1f1b").layer_ranges(4) == [(0, 1), (1, 2), (2, 3),
                                                                                          (3, 4)]


def test_json_round_trip_and_describe():
    plan = Plan(dp=2, pp=2, stage_layers=(3, 1), batch_shares=(6, 2), schedule="gpipe")
    assert Plan.from_json(plan.to_json()) == plan
    assert "gpipe" in plan.describe() and "shares=[6, 2]" in plan.describe()


@pytest.mark.parametrize("plan,batch,needle", [
    (Plan(tp=8), 8, "does not divide n_head=4"),
    (Plan(pp=2, stage_layers=(3, 2), micro_batch_size=2), 8, "sum to n_layer=4"),
    (Plan(pp=5, micro_batch_size=1), 8, "every stage needs at least one block"),
    (Plan(dp=2, dp_engine="deepspeed", zero_stage=4), 8, "ZeRO stages are 1, 2 or 3"),
    (Plan(dp=2, pp=2, dp_engine="deepspeed", zero_stage=1, micro_batch_size=2), 8, "composes with neither tp nor pp"),
    (Plan(dp=2, tp=2, dp_engine="deepspeed", zero_stage=2), 8, "composes with neither tp nor pp"),
    (Plan(dp=2, batch_shares=(5, 2)), 8, "summing to the global batch 8"),
    (Plan(dp=3), 8, "does not split evenly over dp=3"),
    (Plan(pp=2, micro_batch_size=8), 8, "needs at least pp=2 micro-batches"),
    (Plan(pp=2, schedule="interleaved-1f1b", micro_batch_size=2), 8, "needs virtual_stages ≥ 2"),
    (Plan(zero_stage=2), 8, "applies only to dp_engine='deepspeed'"),
    (Plan(rank_order="tp-dp"), 8, "must name tp, dp and pp once each"),
])
def test_each_impossible_plan_gets_one_clear_error(plan, batch, needle):
    problems = plan.problems(MODEL, None, batch)
    assert len(problems) == 1 and needle in problems[0], problems
    with pytest.raises(PlanError, match="invalid plan"):
        plan.validate(MODEL, None, batch)


@pytest.mark.parametrize("plan", [
    Plan(dp=2, tp=2), Plan(dp=2, pp=2, dp_engine="fsdp", micro_batch_size=2),
    Plan(dp=2, tp=2, pp=2, dp_engine="fsdp", micro_batch_size=2), Plan(dp=2, tp=2, pp=2, micro_batch_size=2),
])
def test_every_ddp_and_fsdp_composition_is_accepted(plan):
    """DDP × TP, FSDP2 × PP and FSDP2 × TP × PP run (tests/distributed/test_parity.py) and so validate."""
    assert plan.problems(MODEL, None, 8) == []


def test_world_size_must_match():
    assert "dp×tp×pp = 2×1×2 = 4 ranks, but the job has 2" in Plan(dp=2, pp=2).problems(MODEL, 2, 8)[0]


def test_plan_section_in_job_files_is_validated():
    job = load_job(REPO / "jobs" / "tiny.toml", ["--plan.pp=2", "--plan.stage_layers=[1, 1]",
                                                  "--plan.schedule='gpipe'"])
    assert job.plan.stage_layers == (1, 1) and job.plan.pp == 2
    with pytest.raises(ConfigError, match="plan.stage_layers: \\[2, 1\\] must be ≥ 1 each and sum to n_layer=2"):
        load_job(REPO / "jobs" / "tiny.toml", ["--plan.pp=2", "--plan.stage_layers=[2, 1]", "--plan.schedule='gpipe'"])
    with pytest.raises(ConfigError, match="plan.dp_engine: expected 'ddp' | 'fsdp' | 'deepspeed'"):
        load_job(REPO / "jobs" / "tiny.toml", ["--plan.dp_engine='zero'"])
