"""``distgpt bench ray``: the orchestrator against its references, all measured in one run on one Ray cluster.

1. Time to the first completed step: ``run_on_ray`` (controller actor, placement groups, worker actors, process
   group, trainer) vs Ray Train's ``TorchTrainer`` running the same tiny model with the same worker count, timed the
   same way (from the call to the wall-clock time the first optimizer step finished, written by rank 0).
2. Throughput: tokens/s of the same job and Plan under Ray vs under ``torchrun`` (median of the per-step
   ``tokens_per_s`` the trainer logs, steps after the first), alternated A/B/A/B.
3. Recovery: a run with an injected SIGKILL of one rank; seconds from the failure to the next completed step (the
   driver's ``resumed`` record), beside the checkpoint load it includes.

Everything is on the machine's own Ray cluster (embedded on 127.0.0.1 unless --address/RAY_ADDRESS is given).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distgpt.config import JobConfig, load_job
from distgpt.data.prepare import ensure_prepared
from distgpt.train.metrics import read_records


def _first_step_time(out: str) -> float:
    return next(r["time"] for r in read_records(out) if r.get("kind") is None and "loss" in r)


def _median_tps(out: str) -> float:
    tps = [r["tokens_per_s"] for r in read_records(out) if r.get("kind") is None and "tokens_per_s" in r]
    return statistics.median(tps[1:] or tps)


def _ray_run(src: tuple[str, list[str]], overrides: list[str], out: str) -> dict:
    from distgpt.orchestrator.driver import run_on_ray

    j = load_job(src[0], [*src[1], f"--run.out_dir={out}", *overrides])
    t0 = time.time()
    summary = run_on_ray(j, log=lambda s: None)
    return {"start": t0, "first_step": _first_step_time(out) - t0, "tps": _median_tps(out), "summary": summary}


def _torchrun(src: tuple[str, list[str]], world: int, overrides: list[str], out: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "distgpt.cli", "train", src[0], *src[1],
           f"--run.out_dir={out}", "--cluster.launcher=local", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return _median_tps(out)


def _ray_train_first_step(job: JobConfig, world: int) -> float:
    """Ray Train v2 TorchTrainer: same model and batch; seconds from fit() to rank 0's first finished step."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stamp = tempfile.mktemp(prefix="dg-first-step-")
    cfg = job.gpt_config(257 if job.data.tokenizer == "byte" else job.data.vocab_size)
    loop_cfg = {"cfg": cfg.to_dict(), "stamp": stamp, "data": os.path.abspath(job.prepared_dir),
                "batch": job.train.global_batch_size, "lr": job.train.lr, "seed": job.run.seed, "steps": 3}
    trainer = TorchTrainer(_ray_train_loop, train_loop_config=loop_cfg,
                           scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"dg-bench-{os.getpid()}", storage_path=tempfile.mkdtemp()))
    t0 = time.time()
    trainer.fit()
    return float(Path(stamp).read_text()) - t0


def _ray_train_loop(c: dict) -> None:
    import torch
    from ray import train

    from distgpt.data.loader import DataLoader, TokenDataset
    from distgpt.model.config import GPTConfig
    from distgpt.model.gpt import GPT
    from distgpt.train.objectives.lm import lm_loss

    ctx = train.get_context()
    torch.manual_seed(c["seed"])
    model = train.torch.prepare_model(GPT(GPTConfig(**c["cfg"])))
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"])
    share = c["batch"] // ctx.get_world_size()
    loader = DataLoader(TokenDataset(c["data"], "train"), c["batch"], c["seed"], ctx.get_world_rank(),
                        [share] * ctx.get_world_size())
    for step in range(c["steps"]):
        x, y = loader.next_batch()
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0 and ctx.get_world_rank() == 0:
            Path(c["stamp"]).write_text(str(time.time()))


def run(job_path: str, overrides: list[str], world: int = 2, steps: int = 40) -> int:
    """Print the three comparisons; return 0."""
    from distgpt.orchestrator.driver import connect

    job = load_job(job_path, overrides)
    src = (job_path, list(overrides))
    ensure_prepared(job)
    print(f"ray: {connect(job.cluster.address, job.cluster.embedded_cpus)}")
    base = [f"--plan.dp={world}", f"--train.max_steps={steps}", "--train.log_interval=1", "--train.eval_interval=0",
            "--checkpoint.interval=0", "--sample.max_new_tokens=1"]
    tmp = tempfile.mkdtemp(prefix="dg-bench-ray-")
    ours, ref = [], []
    for i in range(2):  # alternate, so drift hits both
        ours.append(_ray_run(src, [*base, "--train.max_steps=3"], f"{tmp}/first{i}")["first_step"])
        ref.append(_ray_train_first_step(job, world))
    print(f"time to first step: distgpt on Ray {statistics.median(ours):.1f} s, Ray Train TorchTrainer "
          f"{statistics.median(ref):.1f} s → ratio {statistics.median(ours) / statistics.median(ref):.2f} "
          f"(goal ≤ 0.5)   [runs: {', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(ours, ref, strict=True))}]")
    ray_tps, tr_tps = [], []
    for i in range(3):  # this machine drifts by ~10% between minutes: alternate, and compare medians
        ray_tps.append(_ray_run(src, base, f"{tmp}/ray{i}")["tps"])
        tr_tps.append(_torchrun(src, world, base, f"{tmp}/torchrun{i}"))
    r, t = statistics.median(ray_tps), statistics.median(tr_tps)
    print(f"tokens/s, dp={world}, {steps} steps: Ray {r:,.0f}, torchrun {t:,.0f} → ratio {r / t:.3f} (goal ≥ 0.97)"
          f"   [runs: {', '.join(f'{a:,.0f}/{b:,.0f}' for a, b in zip(ray_tps, tr_tps, strict=True))}]")
    _ray_run(src, [*base, "--checkpoint.interval=5", "--checkpoint.async_save=false",
                         f"--cluster.inject=['kill@{steps // 2}:1']"], f"{tmp}/recover")
    resumed = [x for x in read_records(f"{tmp}/recover") if x.get("kind") == "resumed"]
    print(f"recovery from a SIGKILLed rank: {resumed[0]['recovery_s']:.1f} s from the failure to the next completed "
          f"step (goal < 10 s + checkpoint load)")
    return 0
