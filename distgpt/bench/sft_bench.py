"""``distgpt bench sft``: supervised fine-tuning on packed rows vs one conversation per padded row.

Both layouts hold the same conversations; a step costs about the same either way (same rows × seq_len), so what
packing buys is how much of each step is real: tokens that are not padding, and assistant tokens the loss counts.
The two trainers alternate, block by block, so drift of this machine's speed hits both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np


def _trainer(job, prepared: str, packing: bool):
    from distgpt.data.prepare import ensure_prepared
    from distgpt.train.trainer import Trainer

    data = dataclasses.replace(job.data, packing=packing, prepared=prepared)
    job = dataclasses.replace(job, data=data)
    ensure_prepared(job, progress=lambda s: None)
    trainer = Trainer(job, log=lambda s: None)
    roles = trainer.train_set.columns["roles"][:, 1:]  # targets' roles
    per_row = {"real": float((roles != 0).mean() * roles.shape[1]), "assistant": float((roles == 2).mean()
                                                                                       * roles.shape[1])}
    return trainer, per_row


def run(job_path: str, overrides: list[str], steps: int, repeats: int) -> int:
    """Print rows/s, real tokens/s and assistant tokens/s of both layouts and their ratio."""
    from distgpt import storage
    from distgpt.checkpoint.layout import is_model_dir
    from distgpt.config import load_job

    job = load_job(job_path, [*overrides, "--train.progress=false", "--train.tensorboard=false",
                              "--checkpoint.interval=0", "--checkpoint.resume='never'"])
    if job.init.from_ and not is_model_dir(job.init.from_) and not storage.list_dir(job.init.from_):
        print(f"note: {job.init.from_} does not exist — measuring from random weights (the speed is the same)")
        job = dataclasses.replace(job, init=dataclasses.replace(job.init, from_=""))
    with tempfile.TemporaryDirectory() as tmp:
        job = dataclasses.replace(job, run=dataclasses.replace(job.run, out_dir=tmp))
        runs = {name: _trainer(job, f"{tmp}/{name}", name == "packed") for name in ("packed", "padded")}
        for trainer, _ in runs.values():
            for _ in range(2):
                trainer.train_step()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(repeats):
            for name in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
                t0 = time.perf_counter()
                for _ in range(steps):
                    runs[name][0].train_step()
                times[name].append((time.perf_counter() - t0) / steps)
    _report(job, runs, times)
    return 0


def _report(job, runs: dict, times: dict[str, list[float]]) -> None:
    rows = job.train.global_batch_size
    rate = {}
    for name, (trainer, per_row) in runs.items():
        step = statistics.median(times[name])
        rate[name] = {k: rows * v / step for k, v in per_row.items()}
        print(f"{name:6}: {len(trainer.train_set):5} rows for the same conversations, step {step * 1e3:6.1f} ms, "
              f"{rate[name]['real']:9,.0f} real tokens/s, {rate[name]['assistant']:9,.0f} assistant tokens/s")
    per_block = [p / q for p, q in zip(times["padded"], times["packed"], strict=True)]
    print(f"packed / padded: real tokens/s {rate['packed']['real'] / rate['padded']['real']:.2f}×, assistant "
          f"tokens/s {rate['packed']['assistant'] / rate['padded']['assistant']:.2f}×; step-time ratio padded/packed "
          f"per block {min(per_block):.2f}–{max(per_block):.2f} (median {np.median(per_block):.2f})")
