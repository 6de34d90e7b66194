"""The ways a user starts a run on a Ray cluster: ``ray job submit -- distgpt train …``, and a driver that dies and is
started again with the same job (it resumes from the latest committed checkpoint)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ..conftest import REPO
from .test_orchestrator import BASE, records, train

pytestmark = pytest.mark.timeout(600)
TINY = str(REPO / "jobs" / "tiny.toml")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def test_ray_job_submit_runs_distgpt_train(ray_cluster, tiny_data, tmp_path):
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli), "job", "submit", "--address", ray_cluster.jobs_address, "--",
           sys.executable, "-m", "distgpt", "train", TINY, f"--data.prepared={tiny_data}",
           f"--run.out_dir={tmp_path}", *BASE, "--train.max_steps=3", "--plan.dp=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env(), cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # inside the job, distgpt joined the job's cluster (RAY_ADDRESS) instead of starting its own
    assert "ray: Ray cluster at 127.0.0.1:" in p.stdout, p.stdout[-3000:]
    assert "trained 3 steps on Ray" in p.stdout and "succeeded" in p.stdout
    assert (tmp_path / "final" / "model.safetensors").exists()


def _driver(tiny_data: str, out: Path, address: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distgpt", "train", TINY, f"--data.prepared={tiny_data}", f"--run.out_dir={out}",
           f"--address={address}", *BASE, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and step in records(out):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged; driver exit code {proc.poll()}")


def test_a_restarted_driver_resumes_and_finishes_bitwise_equal(ray_cluster, tiny_data, tmp_path):
    common = ["--train.max_steps=10", "--plan.dp=2", "--checkpoint.interval=2"]
    ref = train(tiny_data, tmp_path / "ref", *common)
    out = tmp_path / "restarted"
    # rank 0 stalls before step 7 (a long hang, no watchdog), so the driver is killed at a known point of the run
    first = _driver(tiny_data, out, ray_cluster.cluster.address, *common,
                    "--cluster.hang_timeout_s=3600", "--cluster.inject=['hang@6:0']")
    _wait_for_step(out, 6, first)
    first.kill()  # the driver's death takes its controller, workers and placement groups with it
    first.wait()
    second = _driver(tiny_data, out, ray_cluster.cluster.address, *common)
    log, _ = second.communicate(timeout=400)
    assert second.returncode == 0, log[-3000:]
    assert "resumed from step 6" in log or "resumed from step 4" in log, log[-3000:]
    assert "trained 10 steps on Ray" in log
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ra, rb = records(tmp_path / "ref"), records(out)
    assert sorted(rb) == list(range(1, 11)) and [ra[s]["samples"] for s in ra] == [rb[s]["samples"] for s in ra]
    assert ref["recoveries"] == []


def test_a_driver_whose_ray_job_was_stopped_stops_its_run(ray_cluster, tiny_data, tmp_path):
    """Ray's job supervisor, stopped while the job is PENDING, signals the entrypoint shell the instant it starts and
    can miss the driver it forks: the job reads STOPPED, the driver trains on. Started the way the supervisor starts
    it (a shell in a session of its own, the job's config in the environment), the driver sees its shell gone, stops
    the run (controller and workers end, their slots free) and exits non-zero saying why."""
    from distgpt.bench.cpu_share import descendants
    from distgpt.orchestrator.supervised import RAY_JOB_ENV

    from .ray_cluster import run_actors_alive

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distgpt", "train", TINY, f"--data.prepared={tiny_data}", f"--run.out_dir={out}",
           f"--address={ray_cluster.cluster.address}", *BASE, "--train.max_steps=100000", "--plan.dp=2"]
    log = tmp_path / "driver.log"
    env = {**_env(), RAY_JOB_ENV: json.dumps({"runtime_env": {}, "metadata": {}})}
    shell = subprocess.Popen(f"{shlex.join(cmd)} > {log} 2>&1; true", shell=True, start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and 2 in records(out)):
        time.sleep(0.2)
    assert 2 in records(out), log.read_text()[-3000:]
    driver = descendants(shell.pid)[0]  # the python the shell forked
    shell.kill()  # the shell alone, as the supervisor's stop does when it lists the processes before the fork
    shell.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and os.path.exists(f"/proc/{driver}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{driver}"), "the driver trained on after its job's entrypoint shell ended"
    text = log.read_text()
    assert "the Ray job running this driver was stopped" in text and "resume it by submitting" in text, text[-3000:]
    import ray

    def held() -> list:  # the run's actors still alive, and whether any slot is still taken
        actors = [a.class_name for a in run_actors_alive()]
        free, total = ray.available_resources().get("CPU"), ray.cluster_resources().get("CPU")
        return actors + (["slots"] if free != total else [])

    while time.monotonic() - t0 < 60 and held():
        time.sleep(0.5)
    assert not held()


def test_an_unreachable_address_fails_at_once_with_the_fix(tiny_data, tmp_path, capsys):
    from distgpt.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    args = ["train", TINY, f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}", f"--address=127.0.0.1:{port}"]
    assert main(args) == 1
    assert time.monotonic() - t0 < 20  # ray.init alone would retry for minutes
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in err and "fix:" in err
    assert not (tmp_path / "final").exists()


def test_an_address_other_than_the_connected_cluster_is_refused(ray_cluster, tiny_data, tmp_path, capsys):
    from distgpt.cli import main

    with socket.socket() as s:  # something listens here, but it is not the cluster this process joined
        s.bind(("127.0.0.1", 0))
        s.listen()
        other = f"127.0.0.1:{s.getsockname()[1]}"
        args = ["train", TINY, f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}", f"--address={other}"]
        assert main(args) == 1
    err = capsys.readouterr().err
    assert f"already connected to the Ray cluster at {ray_cluster.cluster.address}, not {other}" in err
    assert not (tmp_path / "final").exists()


def test_distgpt_submit_status_logs_list_and_stop(ray_cluster, tiny_data, tmp_path, capsys):
    """The Jobs SDK path: refused with the reason when it cannot work on a cluster; submitted, followed to success,
    listed; a second job stopped; an unknown id and an unreachable address are one clear error each."""
    import re
    import shutil

    from distgpt.cli import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(TINY, work / "tiny.toml")
    job = str(work / "tiny.toml")
    at = ["--address", ray_cluster.jobs_address]
    ship = ["--allow-local", "--working-dir", str(work), "--python", sys.executable]
    over = [f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path / 'out'}", *BASE, "--plan.dp=2"]
    assert main(["submit", job, *at, *over, "--train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"data.prepared: {tiny_data} — a path on this machine, not on every node" in err and "--allow-local" in err
    assert main(["submit", job, *at, *ship, *over, "--train.max_steps=3"]) == 0
    job_id = re.search(r"submitted (\S+)", capsys.readouterr().out).group(1)
    assert main(["logs", job_id, "--follow", *at]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps on Ray" in out and out.rstrip().endswith(f"{job_id}: SUCCEEDED")
    assert main(["status", job_id, *at]) == 0 and f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["list", *at]) == 0 and job_id in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    assert main(["submit", job, *at, *ship, *over, "--train.max_steps=100000",
                 f"--run.out_dir={tmp_path / 'long'}"]) == 0
    long_id = re.search(r"submitted (\S+)", capsys.readouterr().out).group(1)
    assert main(["stop", long_id, *at]) == 0 and f"{long_id}: STOPPED" in capsys.readouterr().out
    assert main(["status", "raysubmit_nope", *at]) == 2
    assert "no job 'raysubmit_nope' on this cluster" in capsys.readouterr().err
    assert main(["list", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


EMBEDDED = """
import json, os, ray
from distgpt.orchestrator.driver import connect, release
def ours():  # the processes of this cluster (their command lines name its temp dir), by name
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if os.environ["RAY_TMPDIR"] in cmd:
            found[pid] = "monitor" if "autoscaler/_private/monitor.py" in cmd else cmd.split("\\0")[0].rsplit("/")[-1]
    return found
label = connect("", embedded_cpus=1)
ip = ray.remote(num_cpus=0)(lambda: ray.util.get_node_ip_address())
got = {"label": label, "gcs": ray.get_runtime_context().gcs_address, "task": ray.get(ip.remote()),
       "nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "running": sorted(set(ours().values())),
       "usage_stats": __import__("ray._common.usage.usage_lib", fromlist=["x"]).usage_stats_enabled()}
release()
got["after_release"] = sorted(set(ours().values()))
print(json.dumps(got))
"""


def test_the_embedded_cluster_stays_on_loopback(tmp_path):
    """`distgpt train` / `serve --ray` without an address start their own cluster: every address in it is 127.0.0.1
    even when the user's environment does not say so (Ray reads its loopback switch when it is imported, before
    distgpt could set it), and Ray's usage statistics are off. It runs without the autoscaler's monitor, and
    ``release()`` stops it."""
    env = _env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env.pop("RAY_USAGE_STATS_ENABLED")  # the collector's address stays on loopback (conftest), whatever happens
    short = Path(tempfile.mkdtemp(prefix="dgemb", dir="/tmp"))
    env["RAY_TMPDIR"] = str(short)
    try:
        p = subprocess.run([sys.executable, "-c", EMBEDDED], capture_output=True, text=True, timeout=180, env=env)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["label"].startswith("embedded") and got["gcs"].startswith("127.0.0.1:")
    assert got["task"] == "127.0.0.1" and got["nodes"] == ["127.0.0.1"], got
    # an embedded cluster has no autoscaler monitor (nothing to scale; it held shutdown up 1 s), and release()
    # stops what connect() started
    assert "raylet" in got["running"] and "gcs_server" in got["running"] and "monitor" not in got["running"], got
    assert got["after_release"] == [], got
    assert got["usage_stats"] is False  # no usage report leaves the machine (orchestrator/loopback.py)
