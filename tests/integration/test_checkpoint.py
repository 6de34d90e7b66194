"""Sharded checkpoints: resume equals an uninterrupted run; a checkpoint saved under one Plan loads into another;
a corrupt shard is detected; an uncommitted save is ignored. Against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from distgpt.checkpoint.manager import CheckpointError, CheckpointManager
from distgpt.storage import delete_dir
from distgpt.train.trainer import Trainer

from ..conftest import REPO, S3_CREDS, moto_s3, tiny_job


@pytest.fixture(scope="module")
def bucket():
    """s3:// root on a moto server bound to 127.0.0.1 (credentials from the standard AWS environment)."""
    with moto_s3("ckpt") as (port, _):
        yield f"s3://ckpt/{{}}?endpoint_override=127.0.0.1:{port}&scheme=http", S3_CREDS


def run(tiny_data, out, *over):
    return Trainer(tiny_job(tiny_data, str(out), "--train.max_steps=8", "--train.eval_interval=0",
                            "--train.log_interval=1", *over), log=lambda s: None)


@pytest.mark.parametrize("mode", ["process", "thread", "blocking"])
def test_resume_gives_the_same_losses(bucket, tiny_data, tmp_path, mode):
    root = bucket[0].format(f"resume-{mode}")
    how = (f"--checkpoint.async_save={mode != 'blocking'}".lower(),
           f"--checkpoint.async_upload={'thread' if mode == 'blocking' else mode}")
    full = run(tiny_data, tmp_path / "full").fit()
    first = run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=4",
                "--train.max_steps=4", *how).fit()
    resumed = run(tiny_data, tmp_path / "b", f"--checkpoint.uri={root}", "--checkpoint.interval=4", *how)
    assert resumed.step == 4 and resumed.loader.state_dict()["consumed"] == 4 * 8
    second = resumed.fit()
    assert first.losses + second.losses == full.losses  # bit for bit
    # each checkpoint carries the metric records since the previous commit (a driver that lost them gets them back)
    assert [r["step"] for r in resumed.replay] == [1, 2, 3, 4]
    last = CheckpointManager(root).verify(CheckpointManager(root).committed()[-1])
    assert [r["step"] for r in last["records"]] == [5, 6, 7, 8]
    assert [r["loss"] for r in last["records"]] == second.losses


def test_a_checkpoint_in_the_earlier_format_still_resumes(tiny_data, tmp_path, monkeypatch):
    """Checkpoints now hold raw tensor bytes, no per-parameter optimizer hyper-parameters, and their index as JSON;
    those written before (DCP's torch.save records, hyper-parameters included, DCP's pickled index) are refused
    unless trusted — unpickling can run code — and then load and continue with the same losses."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from distgpt.checkpoint import manager, metadata_json
    from distgpt.checkpoint.dcp_io import ArrowReader, ArrowWriter

    def dcp_records(self, plan, planner):  # DCP's own writer: one torch.save archive per item
        fut = FileSystemWriter.write_data(self, plan, planner)
        fut.wait()
        return fut

    root = str(tmp_path / "ck")
    full = run(tiny_data, tmp_path / "full").fit()
    with monkeypatch.context() as m:
        m.setattr(manager, "HYPER", "\0")  # matches no key: hyper-parameters stored, as before
        m.setattr(ArrowWriter, "write_data", dcp_records)
        m.setattr(ArrowWriter, "finish", FileSystemWriter.finish)  # DCP's pickled .metadata …
        m.setattr(metadata_json, "FILE", ".metadata")  # … which the manifest lists, as before
        first = run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=4",
                    "--train.max_steps=4", "--checkpoint.async_save=false").fit()
    with pytest.warns(UserWarning, match="unpickling the index"):
        old = ArrowReader(CheckpointManager(root).uri(4), trust_pickled=True).read_metadata()
    assert any(k.startswith("optim.param_groups.") for k in old.state_dict_metadata)
    assert not any(info.transform_descriptors for info in old.storage_data.values())
    with pytest.raises(CheckpointError, match=r"index is a pickle.*--checkpoint.trust_pickled_metadata=true"):
        run(tiny_data, tmp_path / "b", f"--checkpoint.uri={root}", "--checkpoint.interval=4")
    resumed = run(tiny_data, tmp_path / "b", f"--checkpoint.uri={root}", "--checkpoint.interval=4",
                  "--checkpoint.trust_pickled_metadata=true")
    assert resumed.step == 4
    assert first.losses + resumed.fit().losses == full.losses
    new = ArrowReader(CheckpointManager(root).uri(8)).read_metadata()
    assert not any(k.startswith("optim.param_groups.") for k in new.state_dict_metadata)
    assert all(info.transform_descriptors == ["distgpt-raw-v1"] for info in new.storage_data.values())


def test_too_little_shared_memory_uploads_from_a_thread(tmp_path, tiny_data, monkeypatch):
    from types import SimpleNamespace

    from distgpt.checkpoint import manager

    monkeypatch.setattr(manager.shutil, "disk_usage", lambda path: SimpleNamespace(total=64, used=63, free=1))
    root = str(tmp_path / "ck")
    with pytest.warns(UserWarning, match="/dev/shm has 0 MiB free.*uploading on a thread"):
        t = run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=2",
                "--train.max_steps=2")
        t.fit()
    assert t.checkpoints.upload == "thread"
    assert [c.step for c in CheckpointManager(root).committed()] == [2]


def test_corrupt_shard_detected_and_fallback(bucket, tiny_data, tmp_path):
    root = bucket[0].format("corrupt")
    run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=2",
        "--train.max_steps=4").fit()
    mgr = CheckpointManager(root)
    assert [c.step for c in mgr.committed()] == [2, 4]
    from distgpt import storage

    shard = storage.join(mgr.uri(4), "__0_0.distcp")
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    storage.write_bytes(shard, bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt"):
        run(tiny_data, tmp_path / "b", f"--checkpoint.uri={root}", "--checkpoint.interval=2")
    t = run(tiny_data, tmp_path / "c", f"--checkpoint.uri={root}", "--checkpoint.interval=2",
            "--checkpoint.fallback=true")
    assert t.step == 2
    # An uncommitted save (no manifest) does not exist.
    storage.write_bytes(storage.join(mgr.uri(6), "__0_0.distcp"), b"partial")
    assert [c.step for c in mgr.committed()] == [2, 4]


def test_retention_keeps_last_k(tmp_path, tiny_data):
    root = str(tmp_path / "ck")
    run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=1", "--checkpoint.keep_last=2",
        "--checkpoint.keep_every=3").fit()
    assert [c.step for c in CheckpointManager(root).committed()] == [3, 6, 7, 8]


def _torchrun(nproc: int, *args: str, env: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "distgpt.cli", "train", str(REPO / "jobs" / "tiny.toml"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


_SAVED: dict[tuple[str, ...], tuple[str, list[float], list[float]]] = {}
"""save plan → (checkpoint root holding its step-3 checkpoint, reference losses of 6 steps, losses of steps 1–3):
the save side is the same for every load plan it is paired with, so it runs once (three of the pairs share one)."""


def _ranks(plan: list[str]) -> int:
    """dp×tp×pp of a plan given as overrides."""
    n = 1
    for arg in plan:
        key, _, value = arg.partition("=")
        if key in ("--plan.dp", "--plan.tp", "--plan.pp"):
            n *= int(value)
    return n


def _losses(d) -> list[float]:
    return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("kind") is None]


@pytest.mark.slow
@pytest.mark.parametrize("save_plan,load_plan", [
    (["--plan.dp=2"], ["--plan.tp=2"]),
    (["--plan.dp=2", "--plan.dp_engine='fsdp'"], ["--plan.dp=2"]),
    (["--plan.dp=2"], ["--plan.pp=2", "--plan.schedule='gpipe'"]),
    (["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=3"], ["--plan.dp=2"]),
    (["--plan.dp=2"], ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=2"]),
    (["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=1"],
     ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=3"]),
    (["--model.n_layer=4", "--plan.pp=2", "--plan.schedule='interleaved-1f1b'", "--plan.virtual_stages=2"],
     ["--model.n_layer=4", "--plan.dp=2"]),
    (["--model.n_layer=4", "--plan.dp=2", "--plan.dp_engine='fsdp'"],
     ["--model.n_layer=4", "--plan.pp=2", "--plan.schedule='interleaved-1f1b'", "--plan.virtual_stages=2"]),
    # the compositions added for real model sizes, each way: DDP + TP ⇄ FSDP2 + PP (four ranks each)
    (["--plan.dp=2", "--plan.tp=2"], ["--plan.dp=2", "--plan.pp=2", "--plan.dp_engine='fsdp'"]),
    (["--plan.dp=2", "--plan.pp=2", "--plan.dp_engine='fsdp'"], ["--plan.dp=2", "--plan.tp=2"]),
])
def test_save_under_one_plan_load_under_another(bucket, tiny_data, tmp_path, save_plan, load_plan):
    common = [f"--data.prepared={tiny_data}", "--train.progress=false", "--train.log_interval=1",
              "--train.eval_interval=0", "--model.vocab_size=260", "--model.n_head=2", "--plan.micro_batch_size=2",
              "--sample.max_new_tokens=1"]
    key = tuple(save_plan)
    if key not in _SAVED:
        # One run under the save plan: six steps (the reference), a checkpoint at step 3 and 6; step 6 is then
        # deleted, so every load plan resumes from step 3 and must reproduce steps 4–6 of this same run.
        root = bucket[0].format(f"reshard-{len(_SAVED)}")
        _torchrun(_ranks(save_plan), *common, f"--run.out_dir={tmp_path / 'ref'}", "--train.max_steps=6",
                  f"--checkpoint.uri={root}", "--checkpoint.interval=3", "--checkpoint.keep_last=2", *save_plan,
                  env=bucket[1])
        delete_dir(CheckpointManager(root).uri(6))
        ref = _losses(tmp_path / "ref")
        _SAVED[key] = (root, ref, ref[:3])
    root, ref, first = _SAVED[key]
    # resumes from step 3 under the other Plan; it saves nothing, so the next pair still finds step 3 the latest
    _torchrun(_ranks(load_plan), *common, f"--run.out_dir={tmp_path / 'b'}", "--train.max_steps=6",
              f"--checkpoint.uri={root}", "--checkpoint.interval=0", *load_plan, env=bucket[1])
    assert [c.step for c in CheckpointManager(root).committed()] == [3]
    assert first + _losses(tmp_path / "b") == pytest.approx(ref, rel=1e-4)


def test_export_ls_and_generate(bucket, tiny_data, tmp_path, capsys):
    """…with a fake access key and secret in the root's URI (user info and query): the run, ls, export and generate
    work, and the secret appears in no output, no log, no local file and no stored object."""
    import pyarrow.fs as pafs
    from safetensors.torch import load_file

    from distgpt import storage
    from distgpt.cli import main

    secret = "FAKEsecret0123"
    root = bucket[0].format("export").replace("s3://", f"s3://AKIAFAKE:{secret}@")
    logs: list[str] = []
    res = Trainer(tiny_job(tiny_data, str(tmp_path / "run"), "--train.max_steps=4", "--train.eval_interval=0",
                           "--train.log_interval=1", f"--checkpoint.uri={root}", "--checkpoint.interval=4"),
                  log=logs.append).fit()
    storage.write_bytes(storage.join(root, "step-00000009", "__0_0.distcp"), b"partial")
    capsys.readouterr()
    assert main(["checkpoint", "ls", root]) == 0
    out = capsys.readouterr().out
    assert "step        4" in out and "committed" in out and "partial" in out
    assert "test-secret" not in out and "endpoint_override" not in out
    exported_uri = root.replace("ckpt/export", "ckpt/exported")
    assert main(["checkpoint", "export", root, "--out", str(tmp_path / "export")]) == 0
    assert main(["checkpoint", "export", root, "--out", exported_uri]) == 0
    exported = load_file(tmp_path / "export" / "model.safetensors")
    final = load_file(f"{res.final_dir}/model.safetensors")
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
    manifest = CheckpointManager(root).verify(CheckpointManager(root).committed()[-1])
    assert "endpoint_override" not in json.dumps(manifest)  # URIs in the saved job are redacted
    shown = capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "export"), "--prompt", "def", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def") and len(out) > len("def\n"), "the exported model generated nothing"
    assert main(["checkpoint", "export", root, "--out", str(tmp_path / "x"), "--step", "77"]) == 2
    assert main(["generate", "--checkpoint", exported_uri, "--prompt", "def", "--max-new-tokens", "2"]) == 0
    said = "\n".join(logs) + shown.out + shown.err + "".join(capsys.readouterr())
    assert "s3://ckpt/export" in said and secret not in said
    local = [f for f in tmp_path.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    fs, _ = storage.resolve(root)
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector("ckpt", recursive=True))
               if i.type == pafs.FileType.File]
    stored = [o for o in objects if secret.encode() in storage.read_bytes(
        storage.join(root.replace("ckpt/export", "ckpt"), o.removeprefix("ckpt/")))]
    assert any(o.startswith("ckpt/exported/") for o in objects)
    assert local == [] and stored == []


def _moto(port: int | None = None):
    moto = pytest.importorskip("moto.server")
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


def test_server_stopped_mid_upload_keeps_the_previous_checkpoint(bucket, tiny_data, tmp_path, monkeypatch, capsys):
    """The store disappears while step 4's shard uploads: that save fails after its retries — the run does not —
    and step 2 stays the loadable latest commit."""
    from distgpt import storage as gstorage
    from distgpt.checkpoint import dcp_io as ckstorage

    server, port = _moto()
    fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="test",
                           secret_key="test-secret", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("flaky")
    root = f"s3://flaky/run?endpoint_override=127.0.0.1:{port}&scheme=http"
    over = (f"--checkpoint.uri={root}", "--checkpoint.interval=2", "--checkpoint.async_save=false")
    run(tiny_data, tmp_path / "a", *over, "--train.max_steps=2").fit()
    real = ckstorage.ArrowFileSystem.create_stream

    def stop_during_step_4(self, path, mode):  # the server goes away as step 4's shard starts uploading
        if "w" in mode and "step-00000004" in str(path) and "distcp" in str(path):
            server.stop()
        return real(self, path, mode)

    monkeypatch.setattr(ckstorage.ArrowFileSystem, "create_stream", stop_during_step_4)
    monkeypatch.setattr(gstorage.time, "sleep", lambda s: None)  # skip the retry backoff
    capsys.readouterr()
    assert run(tiny_data, tmp_path / "b", *over, "--train.max_steps=4").fit().steps == 4  # the run finished
    failed = [ln for ln in capsys.readouterr().out.splitlines() if "checkpoint FAILED" in ln]
    assert len(failed) == 1 and re.search(r"failed after 4 attempts.*Could not connect", failed[0]), failed
    assert "training continues and the latest commit is still step 2" in failed[0]
    assert "endpoint_override" not in failed[0]
    monkeypatch.setattr(ckstorage.ArrowFileSystem, "create_stream", real)
    server, _ = _moto(port)  # the same server comes back (moto keeps its objects in this process)
    try:
        assert [c.step for c in CheckpointManager(root).committed()] == [2]
        assert run(tiny_data, tmp_path / "c", *over).step == 2
    finally:
        server.stop()


KILLER = """
import os, signal, sys
from distgpt.checkpoint import dcp_io as s, manager as m
real_stream, real_async = s.ArrowFileSystem.create_stream, m.CheckpointManager.save_async
def killed(self, path, mode):  # thread upload: the training process dies while writing its shard
    if "w" in mode and "step-00000004" in str(path) and "distcp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_stream(self, path, mode)
def killed_after_start(self, step, *a, **k):  # process upload: trainer and save process die as the save runs
    out = real_async(self, step, *a, **k)
    if step == 4:
        os.killpg(0, signal.SIGKILL)
    return out
s.ArrowFileSystem.create_stream = killed
m.CheckpointManager.save_async = killed_after_start
from distgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("upload", ["thread", "process"])
def test_writer_killed_mid_save_leaves_previous_checkpoint(bucket, tiny_data, tmp_path, upload):
    root = bucket[0].format(f"killed-{upload}")
    args = ["train", str(REPO / "jobs" / "tiny.toml"), f"--data.prepared={tiny_data}", f"--run.out_dir={tmp_path}",
            "--train.progress=false", f"--checkpoint.uri={root}", "--checkpoint.interval=2",
            "--train.max_steps=6", "--train.eval_interval=0", "--cluster.launcher=local",
            f"--checkpoint.async_upload={upload}"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, env={**os.environ, **bucket[1]},
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    mgr = CheckpointManager(root)
    assert [c.step for c in mgr.committed()] == [2]  # step 4 was started, never committed
    t = run(tiny_data, tmp_path / "b", f"--checkpoint.uri={root}", "--checkpoint.interval=2")
    assert t.step == 2


def test_init_from_a_checkpoint_root_in_object_storage(bucket, tiny_data, tmp_path):
    """[init] from an s3:// checkpoint root: the model's weights of its latest commit, a fresh optimizer at step 0."""
    import torch

    from distgpt.checkpoint.export import read_checkpoint_model

    root = bucket[0].format("init-source")
    run(tiny_data, tmp_path / "a", f"--checkpoint.uri={root}", "--checkpoint.interval=4", "--train.max_steps=4",
        "--checkpoint.async_save=false").fit()
    t = run(tiny_data, tmp_path / "b", f"--init.from={root}", "--train.max_steps=2")
    assert t.step == 0 and t.engine.optimizer.state == {}
    saved, _, manifest = read_checkpoint_model(root)
    assert manifest["step"] == 4
    got = t.engine.modules[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.state_dict().items())
