"""The planner's ranked Plans run as it says: the best Plan of each shape (dp, tp, pp) the search ranks for a tiny
job on two CPU worker slots is trained for real (torchrun, gloo, ``--plan FILE``), and rank 0 holds the training
state the memory model predicted for it — parameters, gradients and Adam moments, measured at the first step's
optimizer update. (Activation memory is not compared: on CPU there is no per-process allocator figure to read.)"""

from __future__ import annotations

import math

import pytest

from distgpt.config import load_job
from distgpt.planner import cost
from distgpt.planner.cost import Workload
from distgpt.planner.inventory import inventory_from_dict
from distgpt.planner.search import search

from ..conftest import REPO
from .test_parity import COMMON, train


def _best_per_shape() -> list:
    job = load_job(REPO / "jobs" / "tiny.toml", COMMON)
    model = job.gpt_config(260)
    ranked = search(Workload(model, job.train.global_batch_size, 64, "fp32"),
                    inventory_from_dict({"nodes": [{"device": "cpu", "count": 2}]}), top=200, every_option=True).ranked
    best: dict = {}
    for c in ranked:
        if c.plan.world_size == 2 and c.plan.dp_engine != "deepspeed":  # its state is not measured (see parity)
            best.setdefault((c.plan.dp, c.plan.tp, c.plan.pp), c)
    return list(best.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_best_ranked_plan_of_each_shape_trains_and_holds_the_predicted_state(tiny_data, tmp_path):
    chosen = _best_per_shape()
    assert {(c.plan.dp, c.plan.tp, c.plan.pp) for c in chosen} == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
    job = load_job(REPO / "jobs" / "tiny.toml", COMMON)
    model = job.gpt_config(260)
    for i, c in enumerate(chosen):
        plan_file = tmp_path / f"plan{i}.json"
        plan_file.write_text(c.plan.to_json())
        got = train(tmp_path / f"run{i}", tiny_data, 2, ["--plan", str(plan_file)])  # the file replaces [plan]
        assert len(got["losses"]) == 5 and all(math.isfinite(x) for x in got["losses"]), c.plan.describe()
        p = c.plan
        first = p.layer_ranges(model.n_layer)[0]
        params = cost.stage_params(model, first[1] - first[0], True, p.pp == 1, p.tp, p.pp)
        predicted = cost.state_bytes(params, p.dp_engine, p.zero_stage, p.dp, 1 if p.dp_engine == "fsdp" else p.pp)
        assert got["state_bytes"] == pytest.approx(predicted, rel=0.005), p.describe()
        assert c.memory["cpu"] >= predicted  # the peak the search ranked on includes it
