"""``distgpt bench parallel``: tokens/s and memory per rank of each strategy vs a plain torchrun DDP script.

All runs use the same job (model, data, global batch), launched one after another with torchrun on loopback; the
plain DDP reference runs first and last so drift on a noisy machine shows up. Printed as a table; ``--json`` saves
the raw figures (the planner's calibration can read them).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile

STRATEGIES: dict[str, tuple[int, list[str]]] = {
    "ddp dp2": (2, ["--plan.dp=2"]),
    "fsdp2 dp2": (2, ["--plan.dp=2", "--plan.dp_engine='fsdp'"]),
    "zero1 dp2": (2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=1"]),
    "zero2 dp2": (2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=2"]),
    "zero3 dp2": (2, ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=3"]),
    "tp2": (2, ["--plan.tp=2"]),
    "pp2 gpipe": (2, ["--plan.pp=2", "--plan.schedule='gpipe'"]),
    "pp2 1f1b": (2, ["--plan.pp=2"]),
    "fsdp2 dp2 + recompute": (2, ["--plan.dp=2", "--plan.dp_engine='fsdp'", "--plan.recompute=true"]),
    "dp2×tp2 (fsdp)": (4, ["--plan.dp=2", "--plan.tp=2", "--plan.dp_engine='fsdp'"]),
    "dp2×pp2 (ddp)": (4, ["--plan.dp=2", "--plan.pp=2"]),
    "tp2×pp2": (4, ["--plan.tp=2", "--plan.pp=2"]),
}


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


def run(job: str, overrides: list[str], steps: int, json_out: str | None, only: list[str] | None) -> int:
    """Print the table; exit 0 (a strategy that fails is shown as failed, and the exit code becomes 1)."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared

    base = [*overrides, "--train.progress=false", "--train.tensorboard=false"]
    ensure_prepared(load_job(job, base))
    names = [n for n in STRATEGIES if not only or any(o in n for o in only)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"bench parallel: {job} {' '.join(overrides)} | {steps} timed steps | torchrun, gloo, loopback")
        rows["plain DDP dp2 (first)"] = launch(2, job, base, steps, True, tmp)
        for name in names:
            nproc, extra = STRATEGIES[name]
            rows[name] = launch(nproc, job, base + extra, steps, False, tmp)
            print(f"  {name}: done", flush=True)
        rows["plain DDP dp2 (last)"] = launch(2, job, base, steps, True, tmp)
    ok = [r["tokens_per_s"] for k, r in rows.items() if k.startswith("plain") and "error" not in r]
    ref = sum(ok) / len(ok) if ok else float("nan")
    print(f"\n{'strategy':26} {'tokens/s':>10} {'vs plain DDP':>13} {'peak RSS/rank MB':>17} {'state/rank MB':>14}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:26} FAILED: {r['error'][:80]}")
            continue
        print(f"{name:26} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / ref:>12.2f}× {r['peak_mb']:>17,.0f} "
              f"{r['state_mb']:>14.2f}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"job": job, "overrides": overrides, "reference_tokens_per_s": ref, "rows": rows}, f, indent=2)
    return 1 if any("error" in r for r in rows.values()) else 0
