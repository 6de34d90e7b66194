"""``distgpt bench checkpoint``: checkpoint save/load throughput vs raw pyarrow I/O of the same bytes, and the
training stall of an asynchronous save vs a blocking one — all in one run, against one S3-protocol server.

By default it starts moto's S3 server on 127.0.0.1 in a process of its own (in memory: it measures distgpt's overhead,
not a real network);
``--uri s3://bucket/prefix?endpoint_override=…`` points it at your own storage instead.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.fs as pafs

from distgpt import storage
from distgpt.checkpoint.manager import CheckpointManager
from distgpt.checkpoint.storage import list_dir


class _MotoProcess:
    """moto's S3 server in its own process, as a real server would be: in-process, its request handling would take
    the GIL from the client code being measured."""

    def __init__(self, port: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto's S3 server did not start within 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _moto_root() -> tuple[str, _MotoProcess]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _MotoProcess(port)
    fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="bench",
                           secret_key="bench", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bench")
    return f"s3://bench/ckpt?endpoint_override=127.0.0.1:{port}&scheme=http", server


def raw_io(uri: str, blobs: dict[str, bytes]) -> tuple[float, float]:
    """Seconds to write, then read back, the same files with plain pyarrow streams."""
    t0 = time.perf_counter()
    for name, data in blobs.items():
        storage.write_bytes(storage.join(uri, name), data)
    t1 = time.perf_counter()
    for name in blobs:
        storage.read_bytes(storage.join(uri, name))
    return t1 - t0, time.perf_counter() - t1


def run(job: str, overrides: list[str], uri: str | None, repeats: int) -> int:
    """Print throughput ratios and the async stall; exit 0."""
    import os

    from distgpt.config import load_job
    from distgpt.trainer import Trainer, ensure_prepared

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    server = None
    if uri is None:
        uri, server = _moto_root()
    with tempfile.TemporaryDirectory() as out:
        job_cfg = load_job(job, [*overrides, f"--run.out_dir={out}", "--train.progress=false",
                                 "--train.tensorboard=false", "--checkpoint.resume='never'"])
        ensure_prepared(job_cfg, progress=lambda s: None)
        trainer = Trainer(job_cfg, log=lambda s: None)
        for _ in range(3):
            trainer.train_step()
        steps = [trainer.train_step, trainer.train_step]
        step_time = statistics.median(_timed(f) for f in steps * 3)
        rows = []
        for r in range(repeats):
            root = storage.join(uri, f"repeat-{r}")  # join keeps any ?endpoint_override=… at the end
            mgr = CheckpointManager(root, keep_last=10)
            trainer.checkpoints = mgr
            t0 = time.perf_counter()
            mgr.save(100 + r, trainer.engine, {"loader": trainer.loader.state_dict(), "plan_describe": ""})
            save_s = time.perf_counter() - t0
            ck = mgr.uri(100 + r)
            blobs = {f.base_name: storage.read_bytes(storage.join(ck, f.base_name)) for f in list_dir(ck)
                     if f.base_name.startswith("__") or f.base_name == ".metadata"}
            nbytes = sum(map(len, blobs.values()))
            t0 = time.perf_counter()
            mgr.load(trainer.engine)
            load_s = time.perf_counter() - t0
            raw_w, raw_r = raw_io(storage.join(uri, f"raw-{r}"), blobs)
            # the stall: the save_async call, plus whatever the steps taken during the upload lose against normal
            # steps (waiting for the snapshot copy before the optimizer step; sharing CPU and GIL with the upload)
            t0 = time.perf_counter()
            call = mgr.save_async(200 + r, trainer.engine, {"loader": trainer.loader.state_dict(),
                                                             "plan_describe": ""})
            n = 0
            while n == 0 or not mgr.pending.future.done():  # training continues while the upload runs
                trainer.train_step()
                n += 1
            stall = max(0.0, time.perf_counter() - t0 - n * step_time)
            mgr.wait()
            t0 = time.perf_counter()
            mgr.save(300 + r, trainer.engine, {"loader": trainer.loader.state_dict(), "plan_describe": ""})
            blocking = time.perf_counter() - t0
            rows.append((nbytes, save_s, raw_w, load_s, raw_r, stall, blocking, call))
    if server is not None:
        server.stop()
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    nbytes, save_s, raw_w, load_s, raw_r, stall, blocking, call = med
    mb = nbytes / 2**20
    print(f"bench checkpoint: {mb:.1f} MiB per checkpoint, {repeats} repeats (medians), step time {step_time:.3f} s")
    print(f"  save: {mb / save_s:8.1f} MiB/s vs raw pyarrow write {mb / raw_w:8.1f} MiB/s → {raw_w / save_s:.2f}× "
          f"(goal ≥ 0.8×)")
    print(f"  load: {mb / load_s:8.1f} MiB/s vs raw pyarrow read  {mb / raw_r:8.1f} MiB/s → {raw_r / load_s:.2f}× "
          f"(goal ≥ 0.8×)")
    print(f"  training stall: async {stall * 1e3:.1f} ms = {stall / step_time:.1%} of a step (the call itself "
          f"{call * 1e3:.1f} ms, the rest: steps slowed by the background upload); blocking save "
          f"{blocking * 1e3:.1f} ms = {blocking / step_time:.1%} (goal: async < 5%)")
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
