"""One rank of ``distgpt bench parallel``: time training steps of a plan (or of a plain DDP loop) and report.

Run under torchrun: ``python -m distgpt.bench.parallel_worker OUT_JSON JOB [--plain] [--steps N] [overrides]``.
Every rank writes OUT_JSON.rank<k>: tokens/s of the job (global batch tokens / step time), peak resident memory, and
bytes of model state (parameters + gradients + optimizer states) this rank holds.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
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


T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 12: 2.20, 15: 2.14,
       20: 2.09, 30: 2.05}
"""Student's t, 97.5% quantile, by sample count (n − 1 degrees of freedom); 2.0 beyond the table."""


def ratio_interval(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """(geometric-mean ratio reference time / distgpt time, 95% half-width as a fraction) over paired rounds."""
    logs = [math.log(ref / ours) for ref, ours in pairs]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), float("inf")
    t = next((v for n, v in sorted(T95.items()) if n >= len(logs)), 2.0)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(half) - 1


def paired(job, ref: str, steps: int, rounds: tuple[int, int], target: float) -> dict:
    """Blocks of ``steps`` steps of the hand-written ``ref`` and of distgpt, alternating (ABBA) in the same
    processes, until the ratio's 95% interval is within ``target`` (at least rounds[0], at most rounds[1])."""
    from distgpt.bench.handwritten import REFERENCES
    from distgpt.train.trainer import Trainer

    theirs = REFERENCES[ref](job)
    ours = Trainer(job, log=lambda s: None).train_step
    for _ in range(WARMUP):
        theirs()
        ours()

    def block(step, n: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dist.barrier()
        return time.perf_counter() - t0

    if steps <= 0:  # blocks of about 1.5 s: a slow strategy (TP on gloo) gets fewer steps per block, not fewer rounds
        took = torch.tensor(block(ours, 2) / 2)
        dist.broadcast(took, 0)
        steps = max(2, round(1.5 / took.item()))

    pairs: list[tuple[float, float]] = []
    while True:
        first, second = (theirs, ours) if len(pairs) % 2 == 0 else (ours, theirs)
        a, b = block(first, steps), block(second, steps)
        pairs.append((a, b) if first is theirs else (b, a))
        ratio, half = ratio_interval(pairs)
        done = torch.tensor(int(len(pairs) >= rounds[1] or (len(pairs) >= rounds[0] and half <= target)))
        dist.broadcast(done, 0)  # every rank stops together, on rank 0's clock
        if done.item():
            return {"pairs": pairs, "ratio": ratio, "half_width": half, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("job")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pair", help="hand-written reference to alternate with distgpt (bench/handwritten.py)")
    ap.add_argument("--rounds", type=int, nargs=2, default=(6, 40), help="min and max paired rounds")
    ap.add_argument("--target", type=float, default=0.03, help="stop once the 95%% half-width is within this")
    args, overrides = ap.parse_known_args()
    init_distributed()
    job = load_job(args.job, overrides)
    if args.pair:
        report = paired(job, args.pair, args.steps, tuple(args.rounds), args.target)
        if dist.get_rank() == 0:
            with open(f"{args.out}.rank0", "w") as f:
                json.dump(report, f)
        return
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
