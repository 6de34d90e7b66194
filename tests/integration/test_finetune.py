"""Fine-tuning on the session's Ray cluster: SFT on packed conversations from a trained model, with the job's
relative paths (init.from among them) resolved for workers that do not share the driver's directory."""

from __future__ import annotations

import json

import pytest

from distgpt.data.prepare import ensure_prepared
from distgpt.orchestrator.driver import run_on_ray
from distgpt.train.trainer import Trainer

from ..conftest import tiny_job
from .test_orchestrator import BASE

pytestmark = pytest.mark.timeout(600)


def test_sft_from_a_trained_model_runs_on_ray(ray_cluster, tiny_data, tmp_path, monkeypatch):
    Trainer(tiny_job(tiny_data, str(tmp_path / "pre"), "--train.max_steps=2"), log=lambda s: None).fit()
    monkeypatch.chdir(tmp_path)  # the job names the model relative to here; the workers run elsewhere
    job = tiny_job(tiny_data, str(tmp_path / "sft"), *BASE, "--train.max_steps=3", "--plan.dp=2",
                   "--init.from=pre/final", "--objective.kind=sft", "--data.format=chat", "--data.packing=true",
                   "--data.sources=['builtin:chatterbot/english']", "--data.prepared=chat")
    ensure_prepared(job, progress=lambda s: None)
    summary = run_on_ray(job, log=lambda s: None)
    assert summary.state == "finished" and summary.result.steps == 3 and summary.recoveries == []
    recs = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    config = next(r for r in recs if r.get("kind") == "config")
    assert config["job"]["objective"]["kind"] == "sft" and config["job"]["init"]["from"].endswith("pre/final")
    assert len([r for r in recs if r.get("kind") is None and "loss" in r]) == 3
