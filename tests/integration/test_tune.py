"""``distgpt tune`` on the session's Ray cluster: real trials, early stopping, failures, Ctrl-C, resume, write-back."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_job

pytestmark = pytest.mark.timeout(600)

TRIAL_CLASSES = ("ImplicitFunc", "TrainWorker")  # Tune's function-trainable actor, and the ranks it starts


def _alive(job_id: str | None = None) -> dict[str, list]:
    """Trial actors not dead and placement groups not removed (of one Ray job, or of any)."""
    from ray.util.state import list_actors, list_placement_groups

    actors = [a for a in list_actors(limit=10_000, detail=True)
              if a.class_name in TRIAL_CLASSES and (job_id is None or a.job_id == job_id)]
    pgs = [p for p in list_placement_groups(limit=10_000)
           if p.state != "REMOVED" and (job_id is None or p.creator_job_id == job_id)]
    return {"actors": [a for a in actors if a.state != "DEAD"], "pgs": pgs, "all_actors": actors}


def _running(pid: int | None) -> bool:
    import psutil

    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _processes_gone(actors, wait_s: float = 15.0) -> list[int]:
    """The pids of ``actors`` still running after ``wait_s`` (a dead actor's process takes a moment to exit)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [a.pid for a in actors if _running(a.pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_tune_plans_early_stop_failure_and_write_back(ray_cluster, tiny_data, tmp_path):
    """Four real trials over the planner's plans: trial 2 straggles (stopped early by ASHA), trial 3 runs out of
    memory (failed, the tune goes on); the best plan is the best measured one; the profile moves predictions
    towards what was measured; no trial actor or placement group outlives the tune."""
    from distgpt.config import load_job
    from distgpt.planner.calibrate import device_models, load_profile
    from distgpt.planner.plan import Plan
    from distgpt.tune.runner import TuneOptions, tune_job

    job = tiny_job(tiny_data, str(tmp_path / "run"))
    out = str(tmp_path / "tune")
    lines: list[str] = []
    rep = tune_job(job, TuneOptions(out=out, trials=4, steps=8, explore=4, grace_steps=3,
                                    faults={2: ("slow@1",), 3: ("oom@2",)}), log=lines.append)
    by_n = {r.n: r for r in rep.rows}
    assert sorted(by_n) == [1, 2, 3, 4], "\n".join(lines)
    assert by_n[1].status == "finished" and by_n[1].steps == 8
    assert by_n[2].status == "stopped" and "ASHA" in by_n[2].why and by_n[2].steps < 8
    assert by_n[3].status == "failed" and "out of memory" in by_n[3].why and math.isnan(by_n[3].score)
    assert by_n[4].status in ("finished", "stopped")
    measured = [r for r in rep.rows if r.status != "failed"]
    assert rep.best is max(measured, key=lambda r: r.score)
    assert rep.best.tokens_per_s > 0 and rep.best.n != 2  # the straggler is not the best
    arms = json.loads(open(os.path.join(out, "arms.json")).read())["arms"]
    saved = Plan.from_json(open(os.path.join(out, "best_plan.json")).read())
    assert saved == Plan.from_json(json.dumps(arms[rep.best.arm]["plan"]))
    # the written profile moves the planner's predictions of the measured plans towards their measurements
    from distgpt.orchestrator.inventory import ray_nodes, to_inventory
    from distgpt.tune.space import plan_arms

    inv = to_inventory(ray_nodes(job.cluster.cpus_per_worker))
    after = {a.plan: a.predicted_s for a in plan_arms(load_job(REPO / "jobs" / "tiny.toml", [
        f"--data.prepared={tiny_data}"]), inv, devices=device_models(load_profile(os.path.join(out, "profile.json"))))}
    for r in measured:
        if r.n == 2:  # the injected straggler ranks by what it measured but is left out of the refit
            continue
        plan = Plan.from_json(json.dumps(arms[r.arm]["plan"]))
        if plan in after:
            assert abs(after[plan] - r.measured_s) < abs(r.predicted_s - r.measured_s), (r, after[plan])
    assert rep.fit is not None and rep.fit.after < rep.fit.before
    left = _alive()
    assert not left["actors"] and not left["pgs"], left
    assert not _processes_gone(left["all_actors"]), "a trial process outlived the tune"


def test_tune_hparams_scores_validation_loss_into_object_storage(ray_cluster, tiny_data, tmp_path):
    """--space hparams with --out on an S3-protocol server: the job's own point first, every trial scored on
    validation loss after its steps, the results and the best point in the bucket."""
    from distgpt import storage
    from distgpt.tune.runner import TuneOptions, tune_job
    from tests.conftest import moto_s3

    job = tiny_job(tiny_data, str(tmp_path / "run"), "--plan.dp=2")
    with moto_s3("tune") as (port, _):
        out = f"s3://tune/hp?endpoint_override=127.0.0.1:{port}&scheme=http"
        rep = tune_job(job, TuneOptions(out=out, trials=2, steps=6, space="hparams"), log=lambda s: None)
        best = json.loads(storage.read_bytes(storage.join(out, "best_hparams.json")))
        trials = json.loads(storage.read_bytes(storage.join(out, "trials.json")))
        assert storage.exists(storage.join(out, "tune", "tuner.pkl"))  # Tune's experiment, resumable from there
    assert [r.n for r in rep.rows] == [1, 2] and len(trials["trials"]) == 2
    assert rep.rows[0].hparams["lr"] == job.train.lr
    for r in rep.rows:
        assert r.status in ("finished", "stopped")
    done = [r for r in rep.rows if r.status == "finished"]
    assert done and all(r.val_loss > 0 and r.score == -r.val_loss for r in done)
    assert best["lr"] == rep.best.hparams["lr"]


def test_tune_ctrl_c_leaves_nothing_and_resumes(ray_cluster, tiny_data, tmp_path):
    """SIGINT to a tune driver while trial 2 runs: exit 130, no trial actor, process or placement group left; then
    --resume runs the rest and keeps trial 1's result."""
    out = str(tmp_path / "tune")
    cmd = [sys.executable, "-m", "distgpt.cli", "tune", str(REPO / "jobs" / "tiny.toml"), "--trials", "3",
           "--steps", "6", "--explore", "3", "--out", out, "--address", ray_cluster.cluster.address,
           f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    seen: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "trial 2/3" in line and "started" in line:
            time.sleep(4)  # let its ranks start
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=180)
    text = "".join(seen) + rest
    assert proc.returncode == 130, text
    assert "--resume" in text
    left = _alive()
    assert not left["actors"] and not left["pgs"], left
    assert not _processes_gone(left["all_actors"]), "a trial process outlived the tune"
    first = json.load(open(os.path.join(out, "trials.json")))["trials"]
    one = next(t for t in first if t["n"] == 1)
    assert one["status"] == "finished"
    two = next(t for t in first if t["n"] == 2)  # cut short: not a scheduler's stop, and not measured as one
    assert two["status"] == "interrupted", two

    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = json.load(open(os.path.join(out, "trials.json")))
    assert not final["interrupted"] and sorted(t["n"] for t in final["trials"]) == [1, 2, 3]
    again = next(t for t in final["trials"] if t["n"] == 1)
    assert again["measured_s"] == one["measured_s"]  # kept, not run again
    assert not _alive()["actors"]


def test_a_tune_whose_ray_job_was_stopped_stops_its_trials(ray_cluster, tiny_data, tmp_path):
    """``ray job stop`` can miss the driver its entrypoint shell forked (``orchestrator/supervised.py``). A tune
    driver started the supervisor's way (a shell in a session of its own, the job's config in the environment)
    whose shell is killed mid-trial interrupts itself as Ctrl-C would: it says why and how to resume, exits, and
    leaves no trial actor, rank, process or placement group; the saved tune reads interrupted."""
    from distgpt.bench.cpu_share import descendants
    from distgpt.orchestrator.supervised import RAY_JOB_ENV

    out, log = tmp_path / "tune", tmp_path / "driver.log"
    cmd = [sys.executable, "-m", "distgpt.cli", "tune", str(REPO / "jobs" / "tiny.toml"), "--trials", "1",
           "--steps", "100000", "--out", str(out), "--address", ray_cluster.cluster.address,
           f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RAY_JOB_ENV: json.dumps({"runtime_env": {}, "metadata": {}})}
    shell = subprocess.Popen(f"{shlex.join(cmd)} > {log} 2>&1; true", shell=True, start_new_session=True, env=env,
                             cwd=REPO)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "trial 1/1" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    time.sleep(6)  # let its ranks start and step
    assert _alive()["actors"], log.read_text()[-3000:]
    driver = descendants(shell.pid)[0]  # the python the shell forked
    shell.kill()  # the shell alone, as the supervisor's stop does when it lists the processes before the fork
    shell.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90 and _running(driver):
        time.sleep(0.5)
    text = log.read_text()
    assert not _running(driver), "the tune ran on after its job's entrypoint shell ended\n" + text[-3000:]
    assert "the Ray job running this driver was stopped" in text and "--resume" in text, text[-3000:]
    left = _alive()
    assert not left["actors"] and not left["pgs"], left
    assert not _processes_gone(left["all_actors"]), "a trial process outlived the tune"
    assert json.load(open(out / "trials.json"))["interrupted"], text[-3000:]
