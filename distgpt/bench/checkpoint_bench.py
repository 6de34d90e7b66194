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
from distgpt.checkpoint import metadata_json
from distgpt.checkpoint.manager import CheckpointManager


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
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    _report(med, step_time, repeats, server is not None)
    return 0


def _report(med: dict, step_time: float, repeats: int, moto: bool) -> None:
    mb = med["bytes"] / 2**20
    print(f"bench checkpoint: {mb:.1f} MiB per checkpoint, {repeats} repeats (medians), step time {step_time:.3f} s")
    for what, ours, raw in (("save", "save_s", "raw_write_s"), ("load", "load_s", "raw_read_s")):
        print(f"  {what}: {mb / med[ours]:8.1f} MiB/s vs raw pyarrow {'write' if what == 'save' else 'read '} "
              f"{mb / med[raw]:8.1f} MiB/s "
              f"→ {med[raw] / med[ours]:.2f}× (goal ≥ 0.8×)")
    print("  per save, against the step time — stall: training stopped (the save call, then optimizer steps waiting "
          "for the snapshot; goal < 5%); slowdown: the steps run while the upload ran, against as many plain steps "
          "right after it (the save's serialisation, hashing and upload share this machine's cores with training)")
    for target in ("s3", "local"):
        name = ("S3 server" if moto else "--uri") if target == "s3" else "local directory"
        for mode in ("process", "thread"):
            lost, waited = med[f"{target}_{mode}_lost"], med[f"{target}_{mode}_waited"]
            print(f"    {name:15} async, {mode:7} upload: stall {waited * 1e3:5.0f} ms = {waited / step_time:5.1%}   "
                  f"slowdown {lost * 1e3:6.0f} ms = {lost / step_time:6.1%}")
        blocking = med[f"{target}_blocking"]
        print(f"    {name:15} blocking save:         stall {blocking * 1e3:5.0f} ms = {blocking / step_time:5.1%}")
    if moto:
        print(f"    (the S3 server runs on this machine: it used {med['server_cpu']:.2f} CPU-s during one async "
              "upload, out of the same cores training uses)")


def _measure(job: str, overrides: list[str], uri: str, repeats: int, server: _MotoProcess | None):
    """(one row of figures per repeat, the median step time without checkpointing)."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        job_cfg = load_job(job, [*overrides, f"--run.out_dir={out}", "--train.progress=false",
                                 "--train.tensorboard=false", "--checkpoint.resume='never'"])
        ensure_prepared(job_cfg, progress=lambda s: None)
        trainer = Trainer(job_cfg, log=lambda s: None)
        for _ in range(3):
            trainer.train_step()
        step_time = statistics.median(_timed(trainer.train_step) for _ in range(6))
        return [_repeat(trainer, uri, out, r, server) for r in range(repeats)], step_time


def _repeat(trainer, uri: str, out: str, r: int, server: _MotoProcess | None) -> dict[str, float]:
    """One round of every measurement, with fresh checkpoint roots."""
    mgr = CheckpointManager(storage.join(uri, f"repeat-{r}"), keep_last=10)  # join keeps ?endpoint_override=…
    row = {"save_s": _timed(mgr.save, 100 + r, trainer.engine, _meta(trainer))}
    ck = mgr.uri(100 + r)
    blobs = {f.base_name: storage.read_bytes(storage.join(ck, f.base_name)) for f in storage.list_dir(ck)
             if f.base_name.startswith("__") or f.base_name == metadata_json.FILE}
    row["load_s"] = _timed(mgr.load, trainer.engine)
    row["raw_write_s"], row["raw_read_s"] = raw_io(storage.join(uri, f"raw-{r}"), blobs)
    row["bytes"] = sum(map(len, blobs.values()))
    roots = {"s3": storage.join(uri, f"stall-{r}"), "local": storage.join(out, f"local-{r}")}
    for i, (target, root) in enumerate(roots.items()):
        for j, mode in enumerate(("process", "thread")):
            m = CheckpointManager(root, keep_last=10, upload=mode)
            row[f"{target}_{mode}_lost"], row[f"{target}_{mode}_waited"], cpu = async_stall(
                trainer, m, 1000 * r + 100 * i + 10 * j + 10, server if target == "s3" else None)
            row["server_cpu"] = cpu if (target, mode) == ("s3", "process") else row.get("server_cpu", 0.0)
        row[f"{target}_blocking"] = _timed(CheckpointManager(root, keep_last=10).save, 1000 * r + 100 * i + 50,
                                           trainer.engine, _meta(trainer))
    return row


def _meta(trainer) -> dict:
    return {"loader": trainer.loader.state_dict(), "plan_describe": ""}


def async_stall(trainer, mgr: CheckpointManager, step: int, server: _MotoProcess | None,
                sync=lambda: None) -> tuple[float, float, float]:
    """(training time lost to an asynchronous save, the time training waited on it, the server's CPU-seconds).

    Lost time: the steps taken from the save call until the upload ends, against as many plain steps taken right
    after — a reference measured in the same moment, as this machine's speed drifts. It includes everything the
    save costs training here: the call, waiting for the snapshot, and sharing cores (and with a thread upload, the
    GIL) with serialisation, hashing and the upload. ``sync`` waits for the device (a GPU runs ahead of Python)."""
    mgr.save_async(step - 1, trainer.engine, _meta(trainer))  # warm-up: a save process starts once per run
    mgr.wait()
    cpu0 = server.cpu_seconds() if server else 0.0
    sync()
    t0 = time.perf_counter()
    mgr.save_async(step, trainer.engine, _meta(trainer))
    n = 0
    while n == 0 or not mgr.pending.future.done():  # training continues while the upload runs
        trainer.train_step()
        sync()
        n += 1
    during = time.perf_counter() - t0
    waited = mgr.pending.blocked
    cpu = (server.cpu_seconds() if server else 0.0) - cpu0
    mgr.wait()
    plain = _timed(lambda: [(trainer.train_step(), sync()) for _ in range(n)])
    return max(0.0, during - plain), waited, cpu


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
