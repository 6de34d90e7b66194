"""The pieces of ``distgpt tune`` that need no cluster: the space, the searcher, the refit and write-back, scoring,
the trial's job, fault drills and the trial table."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from distgpt.config import load_job
from distgpt.planner.calibrate import device_models, load_profile, save_profile
from distgpt.planner.cost import DeviceModel
from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import inventory_from_dict
from distgpt.planner.refit import Corrections, errors, fit, plan_keys, write_back
from distgpt.tune.space import first_trials, hparam_arms, plan_arms
from tests.conftest import REPO

TWO_CPUS = inventory_from_dict({"nodes": [{"device": "cpu", "count": 2}]})


def _job(*over: str):
    return load_job(REPO / "jobs" / "bench-parallel.toml", list(over))


def test_plan_arms_ranked_and_memory_feasible_only():
    job = _job()
    arms = plan_arms(job, TWO_CPUS)
    assert [a.index for a in arms] == list(range(len(arms)))
    assert all(a.predicted_s <= b.predicted_s for a, b in zip(arms, arms[1:], strict=False))
    assert len({a.plan for a in arms}) == len(arms) > 20  # every option, not one per structure
    # a device with less memory than some plans need: those plans never become arms
    cap = sorted(a.predicted_bytes for a in arms)[len(arms) // 2]
    small = {"cpu": DeviceModel(dataclasses.replace(device_type("cpu"), memory_bytes=cap))}
    fewer = plan_arms(job, TWO_CPUS, devices=small)
    assert 0 < len(fewer) < len(arms) and all(a.predicted_bytes <= cap for a in fewer)


def test_first_trials_cover_structures_then_families_best_first():
    arms = plan_arms(_job(), TWO_CPUS)
    structures = {a.structure for a in arms}
    first = first_trials(arms, len(structures) + 2)
    assert first[0] is arms[0]
    head, tail = first[:len(structures)], first[len(structures):]
    assert {a.structure for a in head} == structures  # every way of cutting the model, before any mechanism
    for a in head:  # each the predicted best of its structure
        assert a is min((b for b in arms if b.structure == a.structure), key=lambda b: b.index)
    assert len({a.family for a in first}) == len(first) and all(a not in head for a in tail)


def test_hparam_arms_start_with_the_job_and_fit_the_plan():
    job = _job("--plan.dp=2", "--plan.micro_batch_size=4")
    arms = hparam_arms(job, job.plan, 6, steps=20, seed=1)
    assert arms[0].hparams == {"lr": job.train.lr, "warmup_steps": float(min(job.train.warmup_steps, 20)),
                               "global_batch_size": 16.0}
    assert len(arms) == 6 and len({tuple(a.hparams.items()) for a in arms}) == 6
    for a in arms:
        assert int(a.hparams["global_batch_size"]) % (2 * 4) == 0
    for a in arms[1:]:
        assert 0 <= a.hparams["warmup_steps"] <= 0.2 * 20


def test_fit_recovers_multiplicative_corrections():
    """Every plan measured 2× its prediction, tensor-parallel ones a further 1.5×: the fit predicts a plan it did
    not see, and the error drops in-sample and leave-one-out."""
    arms = plan_arms(_job(), TWO_CPUS)
    def truth(a):
        return a.predicted_s * 2.0 * (1.5 if "tp" in plan_keys(a.plan) else 1.0)

    seen, unseen = arms[:12], arms[12:]
    points = [a.measured(truth(a)) for a in seen]
    corr = fit(points, ridge=1e-4)
    for a in unseen:
        assert corr.step_time(a.measured(0.0)) == pytest.approx(truth(a), rel=0.05)
    e = errors(points, ridge=1e-4)
    assert e.before > 0.4 and e.after < 0.05 and e.leave_one_out is not None and e.leave_one_out < 0.1


def test_written_profile_moves_the_planner_towards_measurements(tmp_path):
    """write_back → profile file → the planner's predictions move by the measured factor, only for the plans
    using the corrected mechanism."""
    job = _job()
    before = {a.plan: a.predicted_s for a in plan_arms(job, TWO_CPUS)}
    corr = Corrections(time=(("zero2", math.log(0.5)),), memory=(("zero2", 1e6),))
    path = tmp_path / "profile.json"
    save_profile(path, write_back({}, corr, ["cpu"]))
    after = {a.plan: a for a in plan_arms(job, TWO_CPUS, devices=device_models(load_profile(path)))}
    for plan, old in before.items():
        if plan not in after:
            continue
        ratio = after[plan].predicted_s / old
        expected = 0.5 if "zero2" in plan_keys(plan) else 1.0
        assert ratio == pytest.approx(expected, rel=1e-6), plan.describe()


def test_write_back_keeps_an_existing_profile(tmp_path):
    base = write_back({}, Corrections(time=(("base", math.log(2.0)),)), ["cpu"])
    again = write_back(base, Corrections(time=(("base", math.log(1.5)),), memory=(("ddp", 5.0),)), ["cpu"])
    pr = again["cpu"]
    assert dict(pr.step_scale)["base"] == pytest.approx(3.0)
    assert dict(pr.engine_memory)["ddp"] == 5.0
    save_profile(tmp_path / "p.json", again)
    assert load_profile(tmp_path / "p.json")["cpu"] == pr


def test_searcher_explores_then_follows_the_refitted_model(tmp_path):
    from ray.tune.search import Searcher

    from distgpt.tune.searcher import ArmSearcher

    arms = plan_arms(_job(), TWO_CPUS)
    s = ArmSearcher(arms, trials=4, explore=2, adaptive=True)
    first = [s.suggest(f"t{i}") for i in range(2)]
    assert [c["arm"] for c in first] == [a.index for a in first_trials(arms, 2)]
    assert [c["n"] for c in first] == [1, 2]
    # trial 2's family measured 10× faster than predicted, trial 1's as predicted: the model now prefers family 2
    fast = arms[first[1]["arm"]]
    s.on_trial_complete("t0", {"status": "finished", "step_s": arms[first[0]["arm"]].predicted_s, "step": 8,
                               "peak_gb": 0.5})
    s.on_trial_complete("t1", {"status": "finished", "step_s": fast.predicted_s / 10, "step": 8, "peak_gb": 0.5})
    nxt = arms[s.suggest("t2")["arm"]]
    assert plan_keys(nxt.plan) == plan_keys(fast.plan) and nxt.index not in (first[0]["arm"], first[1]["arm"])
    s.on_trial_complete("t2", {"status": "failed", "step_s": 0.0, "step": 1})  # a failure measures nothing
    assert len(s.points()) == 2
    path = tmp_path / "searcher.json"
    s.save(str(path))
    t = ArmSearcher(arms, trials=4, explore=2, adaptive=True)
    t.restore(str(path))
    assert t.assigned == s.assigned and t.measured == s.measured
    assert t.suggest("t3") is not None and t.suggest("t4") == Searcher.FINISHED


def test_scorer_and_failed_trials():
    from distgpt.tune.space import Arm
    from distgpt.tune.trial import Scorer, TrialSettings, failure_reason

    job = _job()
    arm = Arm(0, job.plan, 0.1, 1e9, price_per_hour=2.0)
    sc = Scorer(job, arm, TrialSettings(8))
    for t in (5.0, 0.2, 0.1, 0.3):  # the first step (warm-up) does not count
        m = sc.add({"step_time_s": t, "loss": 3.0, "mem_gb": 0.5})
    assert m["step_s"] == pytest.approx(0.2) and m["score"] == pytest.approx(16 * 128 / 0.2)
    cost = Scorer(job, arm, TrialSettings(8, goal="cost"))
    cost.add({"step_time_s": 0.2, "loss": 3.0})
    assert cost.metrics("running")["score"] == pytest.approx(16 * 128 / 0.2 * 3600 / 2.0)
    failed = sc.metrics("failed", "out of memory: …")
    assert math.isnan(failed["score"]) and failed["status"] == "failed"
    assert failure_reason("training_error: rank 0: OutOfMemoryError: x").startswith("out of memory")
    assert failure_reason("hang: no step completed for 60 s (watchdog)").startswith("hang")


def test_trial_job_runs_the_arm_briefly_without_retries(tmp_path):
    from distgpt.tune.space import Arm
    from distgpt.tune.trial import TrialSettings, trial_job

    job = _job()
    plan = dataclasses.replace(job.plan, dp=2)
    arm = Arm(3, plan, hparams={"lr": 2e-3, "warmup_steps": 2.0, "global_batch_size": 32.0})
    tj = trial_job(job, arm, TrialSettings(10, hang_timeout_s=30), str(tmp_path), ("oom@2",))
    assert tj.plan == plan and tj.train.max_steps == 10 and tj.train.log_interval == 1
    assert (tj.train.lr, tj.train.warmup_steps, tj.train.global_batch_size) == (2e-3, 2, 32)
    assert tj.train.min_lr == pytest.approx(job.train.min_lr * 2e-3 / job.train.lr)
    assert tj.cluster.max_failures == 0 and tj.cluster.hang_timeout_s == 30 and tj.cluster.inject == ["oom@2"]
    assert tj.checkpoint.interval == 0 and tj.checkpoint.resume == "never" and tj.out_dir == str(tmp_path)


def test_oom_and_slow_drills(monkeypatch):
    import torch

    from distgpt.orchestrator.drills import RankDrills
    from distgpt.recovery.faults import SLOW_S, parse_faults

    faults = parse_faults(["oom@3", "slow@1:1"])
    slept: list[float] = []
    monkeypatch.setattr("distgpt.orchestrator.drills.time.sleep", slept.append)
    r0, r1 = RankDrills(0, print), RankDrills(1, print)
    r0.arm(faults)
    r1.arm(faults)
    r0.before_step(2)  # not yet
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        r0.before_step(3)
    r1.before_step(0)
    assert slept == []
    r1.before_step(1)
    r1.before_step(5)
    assert slept == [SLOW_S, SLOW_S]


def test_trial_rows_say_why_each_ended():
    from distgpt.tune.report import row_of
    from distgpt.tune.space import Arm

    arms = [Arm(0, _job().plan, 0.1)]
    def trial(state, **last):
        return SimpleNamespace(status=state, config={"arm": 0, "n": 1}, last_result=last, get_error=lambda: None,
                               trial_id="t1")

    assert row_of(trial("TERMINATED", status="finished", step=8), arms, 9).status == "finished"
    stopped = row_of(trial("TERMINATED", status="running", step=3, training_iteration=3), arms, 9)
    assert stopped.status == "stopped" and "ASHA" in stopped.why
    failed = row_of(trial("TERMINATED", status="failed", reason="out of memory: x", step=2), arms, 9)
    assert failed.status == "failed" and failed.why == "out of memory: x"
    assert row_of(trial("RUNNING", status="running", step=2, training_iteration=2), arms, 9).status == "interrupted"
    # an interrupt marks a running trial TERMINATED, as a scheduler stop does: the ledger tells them apart
    cut = row_of(trial("TERMINATED", status="running", step=3, training_iteration=3), arms, 9, frozenset({"t1"}))
    assert cut.status == "interrupted"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2"], "at least 4 steps"),
    (["--inject", "oom@2"], "TRIAL:KIND@STEP"),
])
def test_tune_cli_refuses_bad_input(argv, message, capsys):
    from distgpt.cli import main

    assert main(["tune", str(REPO / "jobs" / "tiny.toml"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cluster_plan_names_a_plan_file(tmp_path):
    """A tune's best_plan.json is accepted as cluster.plan (and as train --plan): that Plan replaces [plan]."""
    from distgpt.cli.train import read_plan
    from distgpt.config_schema import ConfigError

    plan = dataclasses.replace(_job().plan, dp=2, dp_engine="fsdp", micro_batch_size=8)
    path = tmp_path / "best_plan.json"
    path.write_text(plan.to_json())
    job = _job(f"--cluster.plan='{path}'")
    assert job.plan == plan and job.cluster.plan == "job"
    assert read_plan(str(path)) == plan
    with pytest.raises(ConfigError, match="cluster.plan"):
        _job(f"--cluster.plan='{tmp_path / 'missing.json'}'")


def test_rank_threads_share_the_cores_a_rank_may_use():
    """One rank on a 2-CPU node gets both cores; ranks share their node's CPUs and their machine's cores (simulated
    nodes on one host); train.threads wins."""
    from distgpt.orchestrator.worker_group import rank_threads

    job = _job()
    assert rank_threads(job, [("n1", "10.0.0.1")], {"n1": 2.0}, machine_cores=2) == [2]
    assert rank_threads(job, [("n1", "ip"), ("n1", "ip")], {"n1": 16.0}, machine_cores=16) == [8, 8]
    # two simulated nodes of 2 CPUs each on one 2-core host: one core each, not two
    assert rank_threads(job, [("a", "127.0.0.1"), ("b", "127.0.0.1")], {"a": 2.0, "b": 2.0}, 2) == [1, 1]
    assert rank_threads(_job("--train.threads=3"), [("a", "ip")], {"a": 2.0}, 2) == [3]


def test_a_tune_whose_ray_job_was_already_stopped_does_not_start(monkeypatch, capsys):
    """Inside a Ray job whose entrypoint is already gone, ``distgpt tune`` says so and exits 1 before it connects
    to any cluster (the mid-tune case is tests/integration/test_tune.py)."""
    from distgpt.cli import main
    from distgpt.orchestrator import driver, supervised

    monkeypatch.setenv(supervised.RAY_JOB_ENV, "{}")
    monkeypatch.setattr(supervised.JobWatch, "here", classmethod(lambda cls: cls(1)))  # orphaned: pid 1 adopted it

    def no_connect(*a, **k):
        raise AssertionError("connected to a cluster for a stopped job")

    monkeypatch.setattr(driver, "connect", no_connect)
    monkeypatch.setattr("distgpt.tune.runner.connect", no_connect)
    assert main(["tune", str(REPO / "jobs" / "tiny.toml"), "--out", "/nonexistent/never-written"]) == 1
    assert "the Ray job running this driver was stopped" in capsys.readouterr().err


def test_the_tune_callbacks_pickle_after_ray_replaces_print(monkeypatch):
    """Ray swaps ``builtins.print`` in a driver that receives a worker's tqdm_ray bar; Tune then pickles the tune's
    callbacks with the log they hold. With the builtin as the default log that failed ("Can't pickle <built-in
    function print>: it's not the same object as builtins.print", seen in the Ctrl-C test); the default log is a
    function of distgpt's, pickled by reference, and still prints."""
    import builtins
    import inspect

    import ray.cloudpickle as cloudpickle

    from distgpt.tune.report import Progress
    from distgpt.tune.runner import StopWithTheJob, tune_job

    log = inspect.signature(tune_job).parameters["log"].default
    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)  # what tqdm_ray's safe_print install does
    for callback in (Progress([], 1, log), StopWithTheJob(log)):
        assert cloudpickle.loads(cloudpickle.dumps(callback)).log is log
