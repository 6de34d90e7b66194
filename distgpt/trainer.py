"""The per-rank training loop. No Ray here: it runs in one process, under torchrun, or inside a Ray worker.

One step: for each micro-batch, forward under the chosen precision, scale the loss by the micro-batch's share of the
rank's batch, backward (gradients accumulate); clip; AdamW step; schedule the next learning rate. Metrics (loss,
tokens/s, MFU) go to JSONL / TensorBoard / the progress bar; evaluation runs on the validation split.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distgpt import storage
from distgpt.checkpoint.export import save_model_dir
from distgpt.checkpoint.manager import CheckpointManager
from distgpt.checkpoint.storage import preflight
from distgpt.config import JobConfig, public_dict
from distgpt.data.loader import DataLoader, TokenDataset, load_tokenizer, read_manifest, sample_ids
from distgpt.data.prepare import PrepareSpec, prepare
from distgpt.metrics import MetricsSink, peak_flops, peak_memory_gb, progress_bar
from distgpt.model.gpt import GPT
from distgpt.model.presets import mfu, param_count
from distgpt.optim import lr_at
from distgpt.parallel import OptimSettings, full_state_dict, parallelize
from distgpt.parallel.mesh import build_mesh, init_distributed
from distgpt.planner.plan import Plan


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    losses: list[float]
    """Training loss of every step (mean over the global batch)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    tokens_per_s: float = 0.0
    """Mean throughput over the steps after the first (which pays one-off costs)."""
    step_times: list[float] = field(default_factory=list)
    loop_time: float = 0.0
    """Wall time of the training loop (steps, logging, progress), evaluation excluded."""
    final_dir: str = ""


class StepHooks(Protocol):
    """What a driver (a Ray worker) may add to the loop: hooks run on every rank, between steps."""

    def before_step(self, step: int) -> None:
        """Called before step ``step + 1`` starts (fault injection lives here in tests)."""

    def checkpoint_due(self, step: int) -> bool:
        """True to save a checkpoint after ``step`` besides the interval (every rank must answer alike)."""
        return False


class Sink(Protocol):
    """Where metric records go: ``metrics.jsonl`` by default, the Ray controller under Ray."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def ensure_prepared(job: JobConfig, progress=print) -> dict:
    """The manifest of the job's prepared dataset, preparing it first when none exists (or its seq_len differs)."""
    uri = job.prepared_dir
    if storage.exists(storage.join(uri, "manifest.json")):
        manifest = read_manifest(uri)
        if manifest["seq_len"] == job.seq_len:
            return manifest
        progress(f"prepared data at {uri} has seq_len {manifest['seq_len']}, job wants {job.seq_len}: re-preparing")
    d = job.data
    spec = PrepareSpec(tuple(d.sources), uri, d.tokenizer, d.vocab_size, job.seq_len, d.val_fraction, d.text_field,
                       d.max_bytes, d.shard_samples)
    return prepare(spec, progress)


def pick_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible — use 'auto' or 'cpu'")
    return torch.device(name)


class Trainer:
    """Training of one job on this rank. With one process the Plan is trivial; under torchrun (or a Ray worker that
    has joined a process group) every rank runs the same Trainer and the engine shards the work as the Plan says."""

    def __init__(self, job: JobConfig, log=print, plan: Plan | None = None, sink: Sink | None = None,
                 hooks: StepHooks | None = None):
        self.job = job
        self.hooks = hooks
        self._sink = sink
        t = job.train
        if t.threads:
            torch.set_num_threads(t.threads)
        init_distributed()
        self.plan = plan or job.plan
        self.mesh = build_mesh(self.plan, pick_device(t.device) if self.plan.world_size == 1 else None)
        self.device = self.mesh.device
        self.is_logger = self.mesh.rank == 0
        self.log = log if self.is_logger else (lambda s: None)
        self.tokenizer = load_tokenizer(job.prepared_dir)
        self.train_set = TokenDataset(job.prepared_dir, "train")
        self.val_set = TokenDataset(job.prepared_dir, "val") if job.data.val_fraction > 0 else None
        self.gpt_cfg = job.gpt_config(self.tokenizer.vocab_size)
        torch.manual_seed(job.run.seed)  # same seed ⇒ same init on every rank, same dropout, same losses
        model = GPT(self.gpt_cfg)
        self.engine = parallelize(model, self.mesh, OptimSettings(
            t.lr, t.weight_decay, (t.beta1, t.beta2), t.grad_clip, t.global_batch_size, t.micro_batch_size,
            self.train_set.seq_len))
        if t.dtype == "bf16":
            self.engine.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        self.shares = self.plan.shares(t.global_batch_size)
        self.loader = DataLoader(self.train_set, t.global_batch_size, job.run.seed, self.mesh.coords["dp"],
                                 self.shares)
        self.seq_len = self.train_set.seq_len
        self.step = 0
        self.checkpoint_stalls: list[float] = []
        self.recent_records: list[dict] = []
        """Metric records (rank 0) newer than the last committed checkpoint: each save carries them, so records a
        crash kept from reaching the driver are not lost with the steps the checkpoint covers."""
        self.replay: list[dict] = []
        """The records the resumed-from checkpoint carried (a driver may not have seen them; it drops duplicates)."""
        self.checkpoints = self._checkpoint_manager()

    def _checkpoint_manager(self) -> CheckpointManager | None:
        c = self.job.checkpoint
        if c.interval:
            preflight(self.job.checkpoint_uri)  # an unwritable bucket fails now, not at the first save
        mgr = CheckpointManager(self.job.checkpoint_uri, c.keep_last, c.keep_every, c.async_upload)
        if c.resume == "auto" and mgr.committed():
            manifest = mgr.load(self.engine, fallback=c.fallback)
            self.step = manifest["step"]
            self.loader.load_state_dict(manifest["loader"])
            self.replay = manifest.get("records", [])
            self.log(f"resumed from step {self.step} ({storage.redact(self.job.checkpoint_uri)}), saved under "
                     f"plan {manifest['plan_describe']}")
        return mgr if c.interval else None

    def save_checkpoint(self) -> str:
        """Collective: write this step's sharded checkpoint (manifest last); in the background if configured."""
        assert self.checkpoints is not None
        meta = {"plan": json.loads(self.plan.to_json()), "plan_describe": self.plan.describe(),
                "model": self.gpt_cfg.to_dict(), "loader": self.loader.state_dict(), "job": public_dict(self.job),
                "records": list(self.recent_records)}
        if not self.job.checkpoint.async_save:
            return self.checkpoints.save(self.step, self.engine, meta, self.tokenizer.to_json())
        stall = self.checkpoints.save_async(self.step, self.engine, meta, self.tokenizer.to_json())
        self.checkpoint_stalls.append(stall)
        return (f"snapshot started ({stall * 1e3:.1f} ms here; copied before the next optimizer step), uploading in "
                "the background — steps may run slower until the upload ends")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over a global batch; returns (global mean loss, grad norm) as 0-d tensors."""
        t = self.job.train
        lr = lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        x, y = self.loader.next_batch()
        loss, norm = self.engine.train_step(x, y, lr, t.grad_clip)
        self.step += 1
        return loss, norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed validation set: the first eval_batches global batches, in order."""
        assert self.val_set is not None
        for m in self.engine.modules:
            m.eval()
        t = self.job.train
        val = DataLoader(self.val_set, t.global_batch_size, 0, self.mesh.coords["dp"], self.shares, shuffle=False)
        total = torch.zeros((), device=self.device)
        for _ in range(t.eval_batches):
            x, y = val.next_batch()
            total += self.engine.eval_sum(x, y)
        group = self.mesh.group("dp")
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        for m in self.engine.modules:
            m.train()
        return float(total) / (t.eval_batches * t.global_batch_size)

    def _checkpoint_tick(self, bar) -> None:
        """Commit a finished background save; start a new one at the interval."""
        done = self.checkpoints.poll()
        if done and self.is_logger:
            self._say(bar, f"checkpoint {done}")
        self.recent_records = [r for r in self.recent_records if r["step"] > self.checkpoints.committed_step]
        requested = self.hooks is not None and self.hooks.checkpoint_due(self.step)
        if self.step % self.job.checkpoint.interval == 0 or requested:
            where = self.save_checkpoint()
            if self.is_logger:
                self._say(bar, f"step {self.step}: checkpoint {where}")

    def _say(self, bar, line: str) -> None:
        """A message between steps: above the progress bar here, or to ``log`` when a driver shows the progress."""
        if self._sink is not None:
            self.log(line)
        else:
            bar.write(line)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (a collective: all ranks must call it)."""
        return full_state_dict(self.engine)

    def fit(self) -> TrainResult:
        """Run to train.max_steps; write metrics and the final model; return the losses."""
        job, t = self.job, self.job.train
        sink = (self._sink or MetricsSink(job.out_dir, t.tensorboard)) if self.is_logger else None
        peak, peak_src = peak_flops(self.device, t.peak_tflops) if self.is_logger else (0.0, "")
        peak *= self.mesh.plan.world_size  # MFU of the whole job: all devices' peaks
        n_params = param_count(self.gpt_cfg)
        self.log(f"model: {n_params / 1e6:.2f}M parameters, {self.gpt_cfg.n_layer} layers, d={self.gpt_cfg.n_embd}, "
                 f"{self.gpt_cfg.pos_encoding} positions | data: {len(self.train_set)} train samples of "
                 f"{self.seq_len} tokens | device: {self.device} | plan: {self.plan.describe()} | "
                 f"MFU peak: {peak / 1e12:.2f} TFLOP/s ({peak_src})")
        if sink:
            sink.write({"step": 0, "kind": "config", "job": public_dict(job), "params": n_params, "peak_flops": peak})
        result = TrainResult(steps=0, losses=[])
        tokens_per_step = t.global_batch_size * self.seq_len
        bar = progress_bar(t.max_steps, self.step, t.progress and self.is_logger)
        pending: list[torch.Tensor] = []
        loop_start, eval_time = time.perf_counter(), 0.0
        try:
            while self.step < t.max_steps:
                if self.hooks is not None:
                    self.hooks.before_step(self.step)
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                pending.append(loss)
                result.step_times.append(time.perf_counter() - t0)
                bar.update(1)
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    result.losses += [float(x) for x in pending]  # one host sync per log interval
                    pending.clear()
                    if sink:
                        self._log_train(sink, bar, result, float(norm), tokens_per_step, peak)
                if self.checkpoints is not None:
                    self._checkpoint_tick(bar)
                if self.val_set is not None and (
                    (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.max_steps
                ):
                    e0 = time.perf_counter()
                    val = self.evaluate()
                    eval_time += time.perf_counter() - e0
                    result.val_losses[self.step] = val
                    if sink:
                        self._record(sink, {"step": self.step, "kind": "val", "loss": val})
                        self._say(bar, f"step {self.step}: val loss {val:.4f}")
            if self.checkpoints is not None:
                done = self.checkpoints.wait()  # the last save is committed before the run reports success
                if done:
                    self.log(f"checkpoint {done}")
        finally:
            bar.close()
            if sink:
                sink.close()
        result.loop_time = time.perf_counter() - loop_start - eval_time
        result.steps = self.step
        steady = result.step_times[1:] or result.step_times
        result.tokens_per_s = tokens_per_step * len(steady) / sum(steady)
        result.final_dir = os.path.join(job.out_dir, "final")
        weights = self.full_state_dict()  # collective: every rank takes part
        if self.is_logger:
            meta = {"step": self.step, "job": public_dict(job), "plan": json.loads(self.plan.to_json())}
            save_model_dir(result.final_dir, weights, self.gpt_cfg, self.tokenizer, meta)
        self.log(f"saved final model to {result.final_dir}")
        return result

    def _sample_digest(self) -> list[int]:
        """[first global sample position, crc32 of the global sample ids] of the last step's batch: lets a test
        check that a run with failures consumed exactly the samples of an uninterrupted one."""
        gb = self.job.train.global_batch_size
        start = self.loader.consumed - gb
        ids = sample_ids(len(self.train_set), self.loader.seed, start, gb)
        return [start, zlib.crc32(ids.astype("int64").tobytes())]

    def _record(self, sink: Sink, rec: dict) -> None:
        sink.write(rec)
        if self.checkpoints is not None:  # kept only until a checkpoint covers them
            self.recent_records.append(rec)

    def _log_train(self, sink: MetricsSink, bar, result: TrainResult, norm: float, tokens: int, peak: float) -> None:
        t = self.job.train
        window = result.step_times[-t.log_interval :]
        tps = tokens * len(window) / sum(window)
        rec = {
            "step": self.step,
            "loss": result.losses[-1],
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": norm,
            "tokens_per_s": tps,
            "mfu": mfu(tps, self.gpt_cfg, self.seq_len, peak) if peak else None,
            "step_time_s": window[-1],
            "mem_gb": round(peak_memory_gb(self.device), 3),
            "tokens_seen": self.step * tokens,
            "samples": self._sample_digest(),
        }
        self._record(sink, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
