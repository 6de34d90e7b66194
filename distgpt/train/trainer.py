"""The per-rank training loop. No Ray here: it runs in one process, under torchrun, or inside a Ray worker.

Set-up: process group → mesh → data → model → ``parallelize`` (the Plan's sharding) → objective → resume. One step:
the loader's rows become the objective's batch; the engine runs its micro-batches (forward under the Plan's
precision, the objective's loss, backward), clips, steps AdamW; the schedule sets the next learning rate. Metrics
(loss, tokens/s, MFU) go to JSONL / TensorBoard / the progress bar; evaluation runs on the validation split.
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
from distgpt.config import JobConfig, public_dict
from distgpt.data.loader import DataLoader, TokenDataset, load_tokenizer, sample_ids
from distgpt.data.mixture import open_mixture
from distgpt.model.gpt import GPT, attention_kernels
from distgpt.model.presets import mfu, param_count
from distgpt.parallel import OptimSettings, full_state_dict, parallelize
from distgpt.parallel.mesh import build_mesh, init_distributed
from distgpt.planner.plan import Plan
from distgpt.train.checkpointing import RunCheckpoints, checkpoint_meta
from distgpt.train.init import open_initial
from distgpt.train.metrics import MetricsSink, peak_flops, peak_memory_gb, progress_bar
from distgpt.train.objectives import resolve
from distgpt.train.schedule import lr_at
from distgpt.train.threads import threads_here, use_threads


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    losses: list[float]
    """Training loss of every step (the objective over the global batch)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step."""
    mix_val_losses: dict[str, dict[int, float]] = field(default_factory=dict)
    """Validation loss of each mixed-in dataset (data.mix) by step."""
    tokens_per_s: float = 0.0
    """Mean throughput over the steps after the first (which pays one-off costs)."""
    step_times: list[float] = field(default_factory=list)
    loop_time: float = 0.0
    """Wall time of the training loop (steps, logging, progress), evaluation excluded."""
    final_dir: str = ""


class StepHooks(Protocol):
    """What a driver (a Ray worker) may add to the loop: hooks run on every rank, between steps."""

    def before_step(self, step: int) -> None:
        """Called before step ``step + 1`` starts (fault drills live here)."""

    def checkpoint_due(self, step: int) -> bool:
        """True to save a checkpoint after ``step`` besides the interval (every rank must answer alike)."""
        return False

    def after_step(self, step: int) -> None:
        """Called as soon as step ``step`` is done (before its metrics and any checkpoint): progress reports."""


class BatchSource(Protocol):
    """Where a step's rows come from when not from a prepared dataset: an RL run's rollouts
    (``orchestrator/rl_source.py``). ``bind`` returns the loader the loop uses (``next_columns``, ``state_dict``,
    ``load_state_dict``); ``after_step`` runs on every rank after each step (a collective is allowed there) and
    returns records for rank 0 to write; ``metrics`` adds to each step's record."""

    tokenizer: Any
    seq_len: int
    manifest: dict

    def bind(self, trainer: Trainer) -> Any: ...

    def after_step(self, trainer: Trainer) -> list[dict]: ...

    def metrics(self, step_time_s: float) -> dict[str, Any]: ...


class Sink(Protocol):
    """Where metric records go: ``metrics.jsonl`` by default, the Ray controller under Ray."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def pick_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible — use 'auto' or 'cpu'")
    return torch.device(name)


class Trainer:
    """Training of one job on this rank. With one process the Plan is trivial; under torchrun (or a Ray worker that
    has joined a process group) every rank runs the same Trainer and the engine shards the work as the Plan says.
    A constructed Trainer already stands where its latest checkpoint left off (``resume``, the last set-up step)."""

    def __init__(self, job: JobConfig, log=print, plan: Plan | None = None, sink: Sink | None = None,
                 hooks: StepHooks | None = None, source: BatchSource | None = None):
        self.job, self.hooks, self._sink, self.source = job, hooks, sink, source
        t = job.train
        if t.threads:
            use_threads(t.threads)
        init_distributed()
        self.plan = plan or job.plan
        self.mesh = build_mesh(self.plan, pick_device(t.device) if self.plan.world_size == 1 else None)
        self.device = self.mesh.device
        self.is_logger = self.mesh.rank == 0
        self.log = log if self.is_logger else (lambda s: None)
        self._open_data(job, source)
        self.gpt_cfg = job.gpt_config(self.tokenizer.vocab_size)
        self.objective = resolve(job.objective.kind, job.objective)
        self.objective.check_data(source.manifest if source is not None else self.train_set.manifest)
        torch.manual_seed(job.run.seed)  # same seed ⇒ same dropout, same losses
        model = self._model()
        self.engine = parallelize(model, self.mesh, OptimSettings(
            t.lr, t.weight_decay, (t.beta1, t.beta2), t.grad_clip, t.global_batch_size, self.seq_len),
            self.objective, seed=job.run.seed, weights=self.weights)
        self.weights = None  # each rank has its part now; let the trained file go
        self.shares = self.plan.shares(t.global_batch_size)
        if source is not None:
            self.loader = source.bind(self)
        else:
            rows = open_mixture(self.train_set, job.data.mix, "train", t.global_batch_size) if job.data.mix \
                else self.train_set
            self.loader = DataLoader(rows, t.global_batch_size, job.run.seed, self.mesh.coords["dp"], self.shares)
        self.mix_val = {uri: TokenDataset(uri, "val") for uri in job.data.mix} if self.val_set is not None else {}
        """Validation splits of the mixed-in datasets: their loss shows what continued training forgets."""
        self.saves = RunCheckpoints(job, self.log)
        self.checkpoints = self.saves.manager if self.saves.enabled else None
        self.step = 0
        self._pending: list[torch.Tensor] = []  # losses not yet read back to the host (one sync per log interval)
        self.replay: list[dict] = []
        """The records the resumed-from checkpoint carried (a driver may not have seen them; it drops duplicates)."""
        self.resume()

    def _model(self) -> GPT:
        """The model to parallelize, built on the meta device so that each rank makes only the part it keeps
        (``parallel/materialize.py``), with the values of a one-process init with the run's seed or, from
        ``init.from``, the trained weights (``self.weights``: read one tensor at a time)."""
        self.weights = None
        if self.job.init.from_:
            self.weights, line = open_initial(self.job.init.from_, self.gpt_cfg)
            self.log(line)
        with torch.device("meta"):
            return GPT(self.gpt_cfg)

    def _open_data(self, job: JobConfig, source: BatchSource | None) -> None:
        """The tokenizer and sequence length; the prepared dataset's splits unless batches come from ``source``."""
        if source is not None:
            self.tokenizer, self.seq_len = source.tokenizer, source.seq_len
            self.train_set = self.val_set = None
            return
        self.tokenizer = load_tokenizer(job.prepared_dir)
        self.train_set = TokenDataset(job.prepared_dir, "train")
        self.val_set = TokenDataset(job.prepared_dir, "val") if job.data.val_fraction > 0 else None
        self.seq_len = self.train_set.seq_len

    def resume(self) -> None:
        """Continue from the latest committed checkpoint, if the job allows and one exists: the one place a run
        resumes (engine state resharded to this Plan, loader position, RNG, the records the checkpoint carried)."""
        self.step, self.replay = self.saves.resume(self.engine, self.loader)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over a global batch; returns (the objective's loss, grad norm) as 0-d tensors. The
        loss may still be being summed over the replicas: ``self.engine.settle()`` before reading it."""
        t = self.job.train
        lr = lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        batch = self.objective.make_batch(self.loader.next_columns())
        with attention_kernels(t.attention):  # the kernel chosen in forward is the one its backward runs
            loss, norm = self.engine.train_step(batch, lr, t.grad_clip)
        self.step += 1
        return loss, norm

    @torch.no_grad()
    def evaluate(self, dataset: TokenDataset | None = None) -> float:
        """The objective over a fixed validation set (the job's, or ``dataset``): the first eval_batches global
        batches, in order."""
        dataset = dataset or self.val_set
        assert dataset is not None
        for m in self.engine.modules:
            m.eval()
        t = self.job.train
        val = DataLoader(dataset, t.global_batch_size, 0, self.mesh.coords["dp"], self.shares, shuffle=False)
        sums = torch.zeros(2, device=self.device)
        for _ in range(t.eval_batches):
            numerator, normaliser = self.engine.eval_sums(self.objective.make_batch(val.next_columns()))
            sums += torch.stack([numerator.float(), normaliser.float()])
        group = self.mesh.group("dp")
        if group is not None:
            torch.distributed.all_reduce(sums, group=group)
        for m in self.engine.modules:
            m.train()
        return float(sums[0] / sums[1])

    def save_checkpoint(self) -> str:
        """Collective: write this step's sharded checkpoint (manifest last); in the background if configured."""
        meta = checkpoint_meta(self.plan, self.gpt_cfg, self.loader, public_dict(self.job))
        return self.saves.save(self.step, self.engine, meta, self.tokenizer.to_json())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (a collective: all ranks must call it)."""
        return full_state_dict(self.engine)

    def fit(self) -> TrainResult:
        """Run to train.max_steps; write metrics and the final model; return the losses."""
        job, t = self.job, self.job.train
        sink = (self._sink or MetricsSink(job.out_dir, t.tensorboard)) if self.is_logger else None
        peak = self._start_line(sink)
        result = TrainResult(steps=0, losses=[])
        bar = progress_bar(t.max_steps, self.step, t.progress and self.is_logger)
        loop_start, eval_time = time.perf_counter(), 0.0
        try:
            while self.step < t.max_steps:
                self._one_step(result, sink, bar, peak)
                if self._eval_due():
                    e0 = time.perf_counter()
                    self._evaluate_and_log(result, sink, bar)
                    eval_time += time.perf_counter() - e0
            done = self.saves.finish()
            if done:
                self.log(f"checkpoint {done}")
        finally:
            bar.close()
            if sink:
                sink.close()
        result.loop_time = time.perf_counter() - loop_start - eval_time
        return self._finish(result)

    def _start_line(self, sink: Sink | None) -> float:
        """Log what is about to run; returns the whole job's peak FLOP/s for MFU (0 on ranks that do not log)."""
        t = self.job.train
        peak, peak_src = peak_flops(self.device, t.peak_tflops) if self.is_logger else (0.0, "")
        peak *= self.plan.world_size  # MFU of the whole job: all devices' peaks
        n_params = param_count(self.gpt_cfg)
        self.log(f"model: {n_params / 1e6:.2f}M parameters, {self.gpt_cfg.n_layer} layers, d={self.gpt_cfg.n_embd}, "
                 f"{self.gpt_cfg.pos_encoding} positions | objective: {self.objective.name} | data: "
                 f"{self._data_line()} | device: {self.device}"
                 f"{f' ({threads_here()} threads)' if self.device.type == 'cpu' else ''} | plan: "
                 f"{self.plan.describe()} | MFU peak: {peak / 1e12:.2f} TFLOP/s ({peak_src})")
        if sink:
            sink.write({"step": 0, "kind": "config", "job": public_dict(self.job), "params": n_params,
                        "peak_flops": peak})
        return peak

    def _data_line(self) -> str:
        if self.train_set is None:
            return f"rollouts of {self.seq_len + 1} tokens"
        return f"{len(self.train_set)} train samples of {self.seq_len} tokens"

    def _one_step(self, result: TrainResult, sink: Sink | None, bar, peak: float) -> None:
        """Hooks, one optimizer step, its metrics (one host sync per log interval), the checkpoint cadence."""
        t = self.job.train
        t0 = time.perf_counter()  # a straggling rank's delay (a 'slow' drill) is part of the step it slows
        if self.hooks is not None:
            self.hooks.before_step(self.step)
        loss, norm = self.train_step()
        if self.hooks is not None:
            self.hooks.after_step(self.step)
        self._pending.append(loss)
        result.step_times.append(time.perf_counter() - t0)
        if self.source is not None:  # weight sync and evaluation of an RL run: after the step, outside its time
            for rec in self.source.after_step(self):
                if sink:
                    self._record(sink, rec)
        bar.update(1)
        if self.step % t.log_interval == 0 or self.step == t.max_steps:
            self.engine.settle()  # the last step's loss may still be being summed over the replicas
            result.losses += [float(x) for x in self._pending]
            self._pending = []
            if sink:
                self._log_train(sink, bar, result, float(norm), peak)
        if self.saves.enabled:
            self._checkpoint_tick(bar)

    def _eval_due(self) -> bool:
        t = self.job.train
        return self.val_set is not None and (
            (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.max_steps)

    def _evaluate_and_log(self, result: TrainResult, sink: Sink | None, bar) -> None:
        val = self.evaluate()
        result.val_losses[self.step] = val
        if sink:
            self._record(sink, {"step": self.step, "kind": "val", "loss": val})
            self._say(bar, f"step {self.step}: val loss {val:.4f}")
        for uri, dataset in self.mix_val.items():
            loss = self.evaluate(dataset)
            result.mix_val_losses.setdefault(uri, {})[self.step] = loss
            if sink:
                self._record(sink, {"step": self.step, "kind": "val", "source": storage.redact(uri), "loss": loss})
                self._say(bar, f"step {self.step}: val loss on {storage.redact(uri)} {loss:.4f}")

    def _finish(self, result: TrainResult) -> TrainResult:
        """Throughput over the run, and the final model written (a collective: every rank takes part)."""
        result.steps = self.step
        steady = result.step_times[1:] or result.step_times
        tokens_per_step = self.job.train.global_batch_size * self.seq_len
        result.tokens_per_s = tokens_per_step * len(steady) / sum(steady) if steady else 0.0
        if not self.job.train.save_final:
            return result  # (a tune trial): gathering every weight onto rank 0 would cost more than the trial
        result.final_dir = os.path.join(self.job.out_dir, "final")
        weights = self.full_state_dict()
        if self.is_logger:
            meta = {"step": self.step, "job": public_dict(self.job), "plan": json.loads(self.plan.to_json())}
            save_model_dir(result.final_dir, weights, self.gpt_cfg, self.tokenizer, meta)
        self.log(f"saved final model to {result.final_dir}")
        return result

    def _checkpoint_tick(self, bar) -> None:
        """Commit a finished background save; start a new one at the interval (or when a driver asks)."""
        done = self.saves.commit_finished()
        if done and self.is_logger:
            self._say(bar, f"checkpoint {done}")
        requested = self.hooks is not None and self.hooks.checkpoint_due(self.step)
        if self.saves.due(self.step, requested):
            where = self.save_checkpoint()
            if self.is_logger:
                self._say(bar, f"step {self.step}: checkpoint {where}")
            if requested:
                # A driver's request (preemption, growth) is acted on once the save is committed, and the ranks stop
                # stepping right after it — so nothing would poll a background upload to its commit: wait here.
                done = self.saves.finish()
                if done and self.is_logger:
                    self._say(bar, f"checkpoint {done}")

    def _say(self, bar, line: str) -> None:
        """A message between steps: above the progress bar here, or to ``log`` when a driver shows the progress."""
        if self._sink is not None:
            self.log(line)
        else:
            bar.write(line)

    def _sample_digest(self) -> list[int]:
        """[first global sample position, crc32 of the global sample ids] of the last step's batch: lets a test
        check that a run with failures consumed exactly the samples of an uninterrupted one."""
        if self.train_set is None:
            return self.loader.digest()
        gb = self.job.train.global_batch_size
        start = self.loader.consumed - gb
        ids = sample_ids(len(self.train_set), self.loader.seed, start, gb)
        return [start, zlib.crc32(ids.astype("int64").tobytes())]

    def _record(self, sink: Sink, rec: dict) -> None:
        sink.write(rec)
        self.saves.keep(rec)  # kept only until a checkpoint covers it

    def _log_train(self, sink: Sink, bar, result: TrainResult, norm: float, peak: float) -> None:
        t = self.job.train
        window = result.step_times[-t.log_interval :]
        tps = t.global_batch_size * self.seq_len * len(window) / sum(window)
        rec = {
            "step": self.step,
            "loss": result.losses[-1],
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "grad_norm": norm,
            "tokens_per_s": tps,
            "mfu": mfu(tps, self.gpt_cfg, self.seq_len, peak) if peak else None,
            "step_time_s": window[-1],
            "mem_gb": round(peak_memory_gb(self.device), 3),
            "state_bytes": self.engine.state_bytes,
            "tokens_seen": self.step * t.global_batch_size * self.seq_len,
            "samples": self._sample_digest(),
        }
        if self.source is not None:
            rec.update(self.source.metrics(window[-1]))
        self._record(sink, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
