"""``distgpt bench parallel``: each distgpt strategy against a hand-written script of the *same* strategy.

A strategy and its hand-written equivalent (``bench/handwritten.py``: plain DDP, a ``fully_shard`` loop, a plain
DeepSpeed engine, ``parallelize_module`` TP, a plain pipelining schedule) run in the same torchrun processes, in
alternating blocks of steps (ABBA), so drift on a noisy machine hits both alike; rounds go on until the ratio's 95%
interval is within the target (±3%) or the round limit. ``launch`` (one strategy alone, with its memory) serves the
planner's benches.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, job: str, extra: list[str], steps: int, plain: bool, out_dir: str) -> dict:
    """One torchrun launch of the worker; returns its per-rank reports aggregated."""
    out = os.path.join(out_dir, f"r{len(os.listdir(out_dir))}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_port()}", "-m", "distgpt.bench.parallel_worker", out, job, f"--steps={steps}", *extra]
    if plain:
        cmd.append("--plain")
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # gloo: init_distributed
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    reports = [json.load(open(f)) for f in sorted(glob.glob(out + ".rank*"))]
    return {
        "tokens_per_s": reports[0]["tokens_per_s"],
        "peak_mb": max(r["peak_bytes"] for r in reports) / 2**20,
        "state_mb": max(r["state_bytes"] for r in reports) / 2**20,
    }


PAIRS: dict[str, tuple[str, int, list[str]]] = {
    "ddp dp2": ("ddp", 2, ["--plan.dp=2"]),
    "fsdp2 dp2": ("fsdp", 2, ["--plan.dp=2", "--plan.dp_engine='fsdp'"]),
    "zero1 dp2": ("zero1", 2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=1"]),
    "zero2 dp2": ("zero2", 2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=2"]),
    "zero3 dp2": ("zero3", 2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=3"]),
    "tp2": ("tp", 2, ["--plan.tp=2"]),
    "pp2 gpipe": ("pp-gpipe", 2, ["--plan.pp=2", "--plan.schedule='gpipe'"]),
    "pp2 1f1b": ("pp-1f1b", 2, ["--plan.pp=2"]),
}
"""distgpt strategy → (its hand-written equivalent in bench/handwritten.py, ranks, the Plan as overrides)."""


def launch_pair(ref: str, nproc: int, job: str, extra: list[str], steps: int, rounds: tuple[int, int],
                target: float, out_dir: str) -> dict:
    """One torchrun launch alternating the hand-written ``ref`` and distgpt in the same processes."""
    out = os.path.join(out_dir, f"p{len(os.listdir(out_dir))}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_port()}", "-m", "distgpt.bench.parallel_worker", out, job, f"--steps={steps}",
           f"--pair={ref}", "--rounds", str(rounds[0]), str(rounds[1]), f"--target={target}", *extra]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.load(open(out + ".rank0"))


def run(job: str, overrides: list[str], steps: int, json_out: str | None, only: list[str] | None,
        rounds: tuple[int, int] = (6, 40), target: float = 0.03) -> int:
    """Each distgpt strategy against its hand-written equivalent; print the table. Exit 1 if one failed."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared

    base = [*overrides, "--train.progress=false", "--train.tensorboard=false"]
    ensure_prepared(load_job(job, base))
    names = [n for n in PAIRS if not only or any(o in n for o in only)]
    rows: dict[str, dict] = {}
    print(f"bench parallel: {job} {' '.join(overrides)} | blocks of {steps or '≈1.5 s of'} steps, hand-written and "
          f"distgpt alternating (ABBA) in the same processes until the ratio's 95% interval is within ±{target:.0%} "
          f"({rounds[0]}–{rounds[1]} rounds) | torchrun, gloo, loopback, one thread per rank")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ref, nproc, extra = PAIRS[name]
            rows[name] = launch_pair(ref, nproc, job, base + extra, steps, rounds, target, tmp)
            print(f"  {name}: {_line(rows[name])}", flush=True)
    print(f"\n{'distgpt strategy':18} {'hand-written':13} {'distgpt / hand-written':>23} {'rounds':>7} "
          f"{'ms/step ours':>13} {'theirs':>7}")
    for name, r in rows.items():
        print(f"{name:18} {PAIRS[name][0]:13} {_line(r)}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"job": job, "overrides": overrides, "steps": steps, "rows": rows}, f, indent=2)
    return 1 if any("error" in r for r in rows.values()) else 0


def _line(r: dict) -> str:
    """ratio ± half-width, rounds, and both step times (medians over the rounds)."""
    if "error" in r:
        return f"FAILED: {r['error'][:90]}"
    steps = r["steps"]
    theirs = sorted(a for a, _ in r["pairs"])[len(r["pairs"]) // 2] / steps * 1e3
    ours = sorted(b for _, b in r["pairs"])[len(r["pairs"]) // 2] / steps * 1e3
    return f"{r['ratio']:>15.3f}× ± {r['half_width']:.1%} {len(r['pairs']):>7} {ours:>13.1f} {theirs:>7.1f}"
