"""Storage-fault drills: a fault-injecting proxy (``recovery/storage_faults.py``) between training and a real
S3-protocol server (moto) on loopback makes the store fail, reset connections, disappear or crawl during saves and
loads. A failed save fails that save, not the run; the previous commit stays loadable; nothing partial is loaded; a
resume during an outage waits, says so, and continues when the store is back."""

from __future__ import annotations

import pytest

from distgpt.checkpoint.manager import CheckpointManager
from distgpt.recovery.storage_drill import ModeSwitch
from distgpt.recovery.storage_faults import FaultProxy
from distgpt.train.trainer import Trainer

from ..conftest import REPO, moto_s3, tiny_job

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def store():
    """(proxy, URI template) — the URI reaches moto only through the proxy."""
    with moto_s3("faults") as (port, _), FaultProxy(("127.0.0.1", port), delay_s=0.05) as proxy:
        yield proxy, f"s3://faults/{{}}?endpoint_override={proxy.endpoint}&scheme=http"


def _trainer(tiny_data, tmp_path, root, *over, hooks=None, logs=None):
    job = tiny_job(tiny_data, str(tmp_path), "--train.eval_interval=0", "--train.log_interval=1",
                   f"--checkpoint.uri={root}", "--checkpoint.interval=2", "--checkpoint.outage_wait_s=60", *over)
    return Trainer(job, log=(logs.append if logs is not None else lambda s: None), hooks=hooks)


@pytest.mark.parametrize(("mode", "saving"), [("reset", "async")])  # 503s and a blocking save: the drill below
def test_a_failed_save_fails_the_save_not_the_run(store, tiny_data, tmp_path, capsys, mode, saving):
    proxy, uri = store
    root = uri.format(f"save-{mode}-{saving}")
    proxy.set("pass")
    logs: list[str] = []
    # blocking: the fault covers step 4's save only; async: it covers every upload (started at step 1, over at
    # the end), so no upload can slip past it
    at = {2: mode, 4: "pass"} if saving == "blocking" else {0: mode}
    seen = dict(proxy.requests)
    how = f"--checkpoint.async_save={str(saving == 'async').lower()}"
    t = _trainer(tiny_data, tmp_path, root, "--train.max_steps=6", how, hooks=ModeSwitch(proxy, at), logs=logs)
    res = t.fit()
    proxy.set("pass")
    assert res.steps == 6 and len(res.losses) == 6  # the run finished
    assert proxy.requests[mode] > seen[mode]  # the fault was really met
    failed = [ln for ln in logs + capsys.readouterr().out.splitlines() if "FAILED" in ln]
    kept = "the latest commit is still step 2" if saving == "blocking" else "nothing is committed yet"
    assert failed and f"training continues and {kept}" in failed[0]
    steps = [c.step for c in CheckpointManager(root).committed()]
    assert steps == ([2, 6] if saving == "blocking" else [])
    mgr = CheckpointManager(root)
    for c in mgr.committed():
        mgr.verify(c)  # every commit is whole; the failed save left no commit


def test_the_storage_drill_command(store, tiny_data, tmp_path, capsys):
    """`distgpt drill storage`: 503s during one blocking save (it fails, the run goes on, the next save commits),
    then a resume while the store is down (it waits, says so, resumes from the last commit past a partial save)."""
    from distgpt.cli import main

    proxy, uri = store
    proxy.set("pass")
    root = uri.format("drill")
    args = ["drill", "storage", str(REPO / "jobs" / "tiny.toml"), f"--data.prepared={tiny_data}",
            f"--run.out_dir={tmp_path}", f"--checkpoint.uri={root}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ok     save under faults" in out and "ok     resume in an outage" in out
    assert "commits [2, 6]" in out and "resumed from step 6" in out and "waited and said so" in out
    assert main([*args[:3], f"--checkpoint.uri={tmp_path}/ck", f"--data.prepared={tiny_data}"]) == 2  # not S3


