"""``distgpt bench checkpoint``: checkpoint save/load throughput vs raw pyarrow I/O of the same bytes, and the
training stall of an asynchronous save vs a blocking one — all in one run, against one S3-protocol server.

By default it starts moto's S3 server on 127.0.0.1 in a process of its own (in memory: it measures distgpt's overhead,
not a real network);
``--uri s3://bucket/prefix?endpoint_override=…`` points it at your own storage instead.
"""

from __future__ import annotations

import os
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

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    server = None
    if uri is None:
        uri, server = _moto_root()
    try:
        rows, step_time = _measure(job, overrides, uri, repeats, server)
    finally:
        if server is not None:
            server.stop()
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    nbytes, save_s, raw_w, load_s, raw_r, stall, blocking, call, moto_cpu, local_stall, local_blocking = med
    mb = nbytes / 2**20
    print(f"bench checkpoint: {mb:.1f} MiB per checkpoint, {repeats} repeats (medians), step time {step_time:.3f} s")
    print(f"  save: {mb / save_s:8.1f} MiB/s vs raw pyarrow write {mb / raw_w:8.1f} MiB/s → {raw_w / save_s:.2f}× "
          f"(goal ≥ 0.8×)")
    print(f"  load: {mb / load_s:8.1f} MiB/s vs raw pyarrow read  {mb / raw_r:8.1f} MiB/s → {raw_r / load_s:.2f}× "
          f"(goal ≥ 0.8×)")
    print(f"  training stall: async {stall * 1e3:.1f} ms = {stall / step_time:.1%} of a step (the call itself "
          f"{call * 1e3:.1f} ms, the rest: steps slowed by the background upload); blocking save "
          f"{blocking * 1e3:.1f} ms = {blocking / step_time:.1%} (goal: async < 5%)")
    if server is not None:
        print(f"    (the S3 server on this machine used {moto_cpu:.2f} CPU-s of its 2 cores during that upload)")
    print(f"  training stall to a local directory: async {local_stall * 1e3:.1f} ms = {local_stall / step_time:.1%} "
          f"of a step; blocking save {local_blocking * 1e3:.1f} ms = {local_blocking / step_time:.1%}")
    return 0


def _measure(job: str, overrides: list[str], uri: str, repeats: int, server: _MotoProcess | None):
    """(one row of figures per repeat, the median step time without checkpointing)."""
    from distgpt.config import load_job
    from distgpt.trainer import Trainer, ensure_prepared

    with tempfile.TemporaryDirectory() as out:
        job_cfg = load_job(job, [*overrides, f"--run.out_dir={out}", "--train.progress=false",
                                 "--train.tensorboard=false", "--checkpoint.resume='never'"])
        ensure_prepared(job_cfg, progress=lambda s: None)
        trainer = Trainer(job_cfg, log=lambda s: None)
        for _ in range(3):
            trainer.train_step()
        step_time = statistics.median(_timed(trainer.train_step) for _ in range(6))
        return [_repeat(trainer, uri, out, r, step_time, server) for r in range(repeats)], step_time


def _repeat(trainer, uri: str, out: str, r: int, step_time: float, server: _MotoProcess | None) -> tuple:
    """One round of every measurement, with fresh checkpoint roots."""
    mgr = CheckpointManager(storage.join(uri, f"repeat-{r}"), keep_last=10)  # join keeps ?endpoint_override=…
    trainer.checkpoints = mgr
    save_s = _timed(mgr.save, 100 + r, trainer.engine, _meta(trainer))
    ck = mgr.uri(100 + r)
    blobs = {f.base_name: storage.read_bytes(storage.join(ck, f.base_name)) for f in list_dir(ck)
             if f.base_name.startswith("__") or f.base_name == ".metadata"}
    load_s = _timed(mgr.load, trainer.engine)
    raw_w, raw_r = raw_io(storage.join(uri, f"raw-{r}"), blobs)
    stall, call, server_cpu = async_stall(trainer, mgr, 200 + r, step_time, server)
    blocking = _timed(mgr.save, 300 + r, trainer.engine, _meta(trainer))
    # the same two measurements against a local directory: no server shares this machine's cores
    local = CheckpointManager(storage.join(out, f"local-{r}"), keep_last=10)
    local_stall, _, _ = async_stall(trainer, local, 400 + r, step_time, None)
    local_blocking = _timed(local.save, 500 + r, trainer.engine, _meta(trainer))
    nbytes = sum(map(len, blobs.values()))
    return nbytes, save_s, raw_w, load_s, raw_r, stall, blocking, call, server_cpu, local_stall, local_blocking


def _meta(trainer) -> dict:
    return {"loader": trainer.loader.state_dict(), "plan_describe": ""}


def async_stall(trainer, mgr: CheckpointManager, step: int, step_time: float,
                server: _MotoProcess | None) -> tuple[float, float, float]:
    """(training time lost to an asynchronous save, the save_async call alone, the server's CPU-seconds meanwhile).

    Lost time: the call, plus whatever the steps taken while the upload runs lose against normal steps (waiting for
    the snapshot copy before the optimizer step; sharing cores and the GIL with the upload)."""
    cpu0 = server.cpu_seconds() if server else 0.0
    t0 = time.perf_counter()
    call = mgr.save_async(step, trainer.engine, _meta(trainer))
    n = 0
    while n == 0 or not mgr.pending.future.done():  # training continues while the upload runs
        trainer.train_step()
        n += 1
    lost = max(0.0, time.perf_counter() - t0 - n * step_time)
    cpu = (server.cpu_seconds() if server else 0.0) - cpu0
    mgr.wait()
    return lost, call, cpu


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
