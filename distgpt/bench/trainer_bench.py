"""``distgpt bench trainer``: the distgpt training loop against a minimal hand-written PyTorch loop.

Both train the same model (same init) on the same prepared data with the same optimizer, clipping and batch, in
the same process, alternating A/B runs so machine noise hits both alike. distgpt's loop is measured as a user runs
it (data loading, LR schedule, metrics, progress bar, JSONL + TensorBoard); the hand-written one does only the math.
The figure is the ratio of median per-step wall times: overhead = distgpt / plain − 1.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from distgpt.config import JobConfig, load_job
from distgpt.data.loader import TokenDataset, sample_ids
from distgpt.data.prepare import ensure_prepared
from distgpt.model.gpt import GPT
from distgpt.train.objectives.lm import lm_loss
from distgpt.train.trainer import Trainer

WARMUP = 3  # steps excluded from timing in both loops (allocator and thread-pool warm-up)


def plain_loop(job: JobConfig, vocab: int, steps: int) -> float:
    """Seconds per step of the simplest correct loop: preloaded batches, forward, backward, clip, AdamW."""
    t = job.train
    data = TokenDataset(job.prepared_dir, "train")
    ids = sample_ids(len(data), job.run.seed, 0, t.global_batch_size * (steps + WARMUP))
    batches = data.take(np.asarray(ids)).view(steps + WARMUP, t.global_batch_size, -1)
    torch.manual_seed(job.run.seed)
    model = GPT(job.gpt_config(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    micro = job.plan.micro_batch_size or t.global_batch_size
    start = 0.0
    for i, batch in enumerate(batches):
        if i == WARMUP:
            start = time.perf_counter()
        for j in range(0, len(batch), micro):
            s = batch[j : j + micro]
            (lm_loss(model(s[:, :-1]), s[:, 1:]) * (len(s) / len(batch))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def distgpt_loop(job: JobConfig, steps: int) -> float:
    """Seconds per step of Trainer.fit's loop (evaluation excluded), as a user runs it."""
    with tempfile.TemporaryDirectory() as out:
        job.run.out_dir = out
        job.train.max_steps = steps + WARMUP
        res = Trainer(job, log=lambda s: None).fit()
    # fit's loop time covers every step; drop the warm-up steps by their measured step times.
    return (res.loop_time - sum(res.step_times[:WARMUP])) / steps


def run(job_path: str, overrides: list[str], steps: int, repeats: int) -> int:
    """Print both loops' per-step times and their ratio; exit 0."""
    overrides = [*overrides, "--train.eval_interval=0"]  # evaluation is not training-loop overhead
    job = load_job(job_path, overrides)
    vocab = ensure_prepared(job)["tokenizer"]["vocab_size"]
    plain, ours = [], []
    print(f"bench trainer: {job_path}, {steps} timed steps × {repeats} repeats, "
          f"{job.train.global_batch_size} × {job.seq_len} tokens per step, {torch.get_num_threads()} threads")
    for r in range(repeats):
        plain.append(plain_loop(job, vocab, steps))
        ours.append(distgpt_loop(load_job(job_path, overrides), steps))
        print(f"  repeat {r + 1}: plain {plain[-1] * 1e3:.1f} ms/step, distgpt {ours[-1] * 1e3:.1f} ms/step")
    p, o = statistics.median(plain), statistics.median(ours)
    tokens = job.train.global_batch_size * job.seq_len
    print(f"median step time: plain {p * 1e3:.1f} ms ({tokens / p:,.0f} tok/s), "
          f"distgpt {o * 1e3:.1f} ms ({tokens / o:,.0f} tok/s)")
    print(f"distgpt / plain step time = {o / p:.3f}  (overhead {100 * (o / p - 1):+.1f}%, goal ≤ +3%)")
    return 0
