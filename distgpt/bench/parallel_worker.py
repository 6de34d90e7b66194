"""One rank of ``distgpt bench parallel``: time training steps of a plan (or of a plain DDP loop) and report.

Run under torchrun: ``python -m distgpt.bench.parallel_worker OUT_JSON JOB [--plain] [--steps N] [overrides]``.
Every rank writes OUT_JSON.rank<k>: tokens/s of the job (global batch tokens / step time), peak resident memory, and
bytes of model state (parameters + gradients + optimizer states) this rank holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist

from distgpt.config import load_job
from distgpt.data.loader import DataLoader, TokenDataset, load_tokenizer
from distgpt.model.gpt import GPT
from distgpt.parallel.mesh import init_distributed
from distgpt.train.objectives.lm import lm_loss

WARMUP = 3


def state_bytes(modules: list[torch.nn.Module], optimizer) -> int:
    """Bytes of parameters, gradients and optimizer states held locally (DTensors by their local shard)."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        t = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for m in modules:
        for p in m.parameters():
            add(p)
            if p.grad is not None:
                add(p.grad)
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    for st in inner.state.values():
        for v in st.values():
            add(v)
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO's fp32 partitions
        for t in getattr(optimizer, attr, []) or []:
            add(t)
    return total


def plain_ddp(job, steps: int) -> tuple[float, list]:
    """The reference: hand-written DDP over the same model and data, nothing else."""
    data = TokenDataset(job.prepared_dir, "train")
    world, rank = dist.get_world_size(), dist.get_rank()
    loader = DataLoader(data, job.train.global_batch_size, job.run.seed, rank, [job.train.global_batch_size // world]
                        * world)
    torch.manual_seed(job.run.seed)
    model = torch.nn.parallel.DistributedDataParallel(GPT(job.gpt_config(load_tokenizer(job.prepared_dir).vocab_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr)
    t0 = 0.0
    for i in range(steps + WARMUP):
        if i == WARMUP:
            dist.barrier()
            t0 = time.perf_counter()
        x, y = loader.next_batch()
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    return time.perf_counter() - t0, [model, opt]


def distgpt_plan(job, steps: int) -> tuple[float, list]:
    """The engine under test, through the Trainer's own step."""
    from distgpt.train.trainer import Trainer

    trainer = Trainer(job, log=lambda s: None)
    t0 = 0.0
    for i in range(steps + WARMUP):
        if i == WARMUP:
            dist.barrier()
            t0 = time.perf_counter()
        trainer.train_step()
    dist.barrier()
    return time.perf_counter() - t0, [trainer.engine.modules, trainer.engine.optimizer]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("job")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    args, overrides = ap.parse_known_args()
    init_distributed()
    job = load_job(args.job, overrides)
    elapsed, (modules, opt) = (plain_ddp if args.plain else distgpt_plan)(job, args.steps)
    modules = modules if isinstance(modules, list) else [modules]
    tokens = job.train.global_batch_size * job.seq_len * args.steps
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"tokens_per_s": tokens / elapsed, "peak_bytes": peak, "state_bytes": state_bytes(modules, opt)}
    with open(f"{args.out}.rank{dist.get_rank()}", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
