"""Score the cost model against a table of measured training runs. Pure: no torch, no Ray.

A table is a CSV with one measured run per row (``planner/data/published_runs.csv`` ships one built from published
benchmarks; every row names its source). Columns:

  source, split, run                        where the figure comes from; 'fit' or 'held_out'; a short name
  n_layer, n_embd, n_head, vocab_size,      the model (a GPT: learned positions, ffn = ffn_mult × n_embd)
  seq_len, ffn_mult, bias
  device, gpus_per_node, nodes,             the cluster (a catalog device name; node network bandwidth in GB/s)
  network_gbps
  dp, tp, pp, micro_batch, global_batch,    the plan (engine: ddp | fsdp | deepspeed)
  engine, zero_stage, recompute, dtype,
  flash_attention
  step_time_s, peak_memory_gib              what was measured (peak memory may be empty)
  memory_measure                            optional: 'device' (default: all the process holds, as nvidia-smi or
                                            max_memory_reserved show it) or 'allocated' (torch's
                                            max_memory_allocated: tensors only, so the prediction leaves out the
                                            runtime overhead — CUDA context, NCCL buffers, allocator cache)
  tie_embeddings                            optional: false where the output layer has its own weights (default
                                            true, as GPT-2 and MPT tie them)
  system                                    optional: what ran it, where one source measured several systems
                                            (default: the source's repository)
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from distgpt.errors import DistgptError
from distgpt.model.config import GPTConfig
from distgpt.planner.cost import DeviceModel, Workload
from distgpt.planner.evaluate import Candidate, predict
from distgpt.planner.hardware import device_type
from distgpt.planner.inventory import Inventory, NodeGroup
from distgpt.planner.plan import Plan

PUBLISHED = Path(__file__).parent / "data" / "published_runs.csv"
GIB = 2**30


class TableError(DistgptError, ValueError):
    """A table of measured runs that cannot be read; the message names the file, row and column."""


@dataclass(frozen=True)
class MeasuredRun:
    """One row of a table: what ran, where, and what was measured."""

    source: str
    split: str
    run: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq_len: int
    ffn_mult: int
    bias: bool
    device: str
    gpus_per_node: int
    nodes: int
    network_gbps: float
    dp: int
    tp: int
    pp: int
    micro_batch: int
    global_batch: int
    engine: str
    zero_stage: int
    recompute: bool
    dtype: str
    flash_attention: bool
    step_time_s: float
    peak_memory_gib: float | None = None
    memory_measure: str = "device"
    tie_embeddings: bool = True
    system: str = ""

    @property
    def model_key(self) -> tuple[int, int, int]:
        """Rows that train the same model (rank agreement compares their plans)."""
        return self.n_layer, self.n_embd, self.seq_len

    @property
    def measured_by(self) -> str:
        """The system the row names, else the repository (owner/name) its source URL points into, else the
        source."""
        if self.system:
            return self.system
        parts = self.source.split("/")
        github = self.source.startswith("https://github.com/") and len(parts) > 4
        return "/".join(parts[3:5]) if github else self.source[:40]

    @property
    def job_key(self) -> tuple[int, ...]:
        """Rows that are one job on one cluster — same model, batch and GPUs — run under different plans: the
        choice a planner makes."""
        return (*self.model_key, self.global_batch, self.gpus_per_node * self.nodes)


def _parse(raw: str, typ: type, where: str):
    raw = raw.strip()
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return typ(raw)
    except ValueError:
        raise TableError(f"{where}: {raw!r} is not a {typ.__name__}") from None


def load_table(path: str | Path) -> list[MeasuredRun]:
    """Every row of the CSV at ``path``, checked: a missing column or a bad value names its row and column."""
    p = Path(path)
    if not p.is_file():
        raise TableError(f"{p}: no such table (a CSV of measured runs; see distgpt/planner/accuracy.py for columns)")
    cols = {f.name: f for f in fields(MeasuredRun)}
    types = {"int": int, "float": float, "bool": bool, "str": str, "float | None": float}
    optional = {"peak_memory_gib": None, "memory_measure": "device", "tie_embeddings": True, "system": ""}
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in cols if c not in optional and c not in (reader.fieldnames or [])]
        if missing:
            raise TableError(f"{p}: missing column(s) {', '.join(missing)}")
        out = []
        for i, row in enumerate(reader, start=2):
            vals = {}
            for name, f in cols.items():
                raw = (row.get(name) or "").strip()
                where = f"{p}:{i} column {name}"
                if not raw:
                    if name in optional:
                        vals[name] = optional[name]
                        continue
                    raise TableError(f"{where}: empty")
                vals[name] = _parse(raw, types[str(f.type)], where)
            run = MeasuredRun(**vals)
            _check(run, f"{p}:{i}")
            out.append(run)
    if not out:
        raise TableError(f"{p}: no rows")
    return out


def _check(r: MeasuredRun, where: str) -> None:
    try:
        device_type(r.device)
    except KeyError as e:
        raise TableError(f"{where} column device: {e.args[0]}") from None
    if r.dp * r.tp * r.pp != r.gpus_per_node * r.nodes:
        raise TableError(f"{where}: dp×tp×pp = {r.dp * r.tp * r.pp} but the cluster has "
                         f"{r.gpus_per_node}×{r.nodes} GPUs")
    if r.global_batch % (r.micro_batch * r.dp):
        raise TableError(f"{where}: global_batch {r.global_batch} is not a multiple of micro_batch × dp")
    if r.engine not in ("ddp", "fsdp", "deepspeed") or r.split not in ("fit", "held_out") or r.step_time_s <= 0 \
            or r.memory_measure not in ("device", "allocated"):
        raise TableError(f"{where}: engine must be ddp|fsdp|deepspeed, split fit|held_out, step_time_s > 0, "
                         f"memory_measure device|allocated")


def run_inputs(r: MeasuredRun) -> tuple[Plan, Workload, Inventory]:
    """The Plan, workload and one-group inventory the cost model sees for a row."""
    model = GPTConfig(vocab_size=r.vocab_size, block_size=r.seq_len, n_layer=r.n_layer, n_head=r.n_head,
                      n_embd=r.n_embd, ffn_mult=r.ffn_mult, bias=r.bias, tie_embeddings=r.tie_embeddings)
    dev = device_type(r.device)
    inv = Inventory((NodeGroup(r.device, dev, r.gpus_per_node, r.nodes, network_bw=r.network_gbps * 1e9),))
    plan = Plan(dp=r.dp, tp=r.tp, pp=r.pp, micro_batch_size=r.micro_batch, dp_engine=r.engine,  # type: ignore[arg-type]
                zero_stage=r.zero_stage, recompute=r.recompute, dtype=r.dtype)  # type: ignore[arg-type]
    return plan, Workload(model, r.global_batch, r.seq_len, r.dtype, r.flash_attention), inv


@dataclass(frozen=True)
class Scored:
    """One row's prediction beside its measurement."""

    run: MeasuredRun
    step_time_s: float
    memory_gib: float
    fits: bool

    @property
    def step_error(self) -> float:
        """Signed relative error of the predicted step time."""
        return self.step_time_s / self.run.step_time_s - 1

    @property
    def memory_error(self) -> float | None:
        m = self.run.peak_memory_gib
        return None if m is None else self.memory_gib / m - 1


def score_run(r: MeasuredRun, devices: dict[str, DeviceModel] | None = None) -> Scored:
    """Predict one row (scored even where the model predicts it does not fit; ``fits`` says so)."""
    plan, w, inv = run_inputs(r)
    devices = devices or {}
    dev = devices.get(r.device)
    c = predict(plan, w, inv, {inv.groups[0].device.name: dev} if dev else {}, check_memory=False)
    if not isinstance(c, Candidate):
        raise TableError(f"row {r.run!r}: the cost model cannot score this plan ({c})")
    mem = max(c.memory.values())
    if r.memory_measure == "allocated":  # tensors only: what torch counts, without the runtime's own memory
        model = dev or DeviceModel(inv.groups[0].device)
        mem -= model.overhead
    return Scored(r, c.step_time, mem / GIB, all(c.memory[k] <= c.capacity[k] for k in c.memory))


@dataclass
class Summary:
    """Errors and rank agreement over a set of scored rows."""

    rows: int
    step_mean: float
    step_median: float
    step_max: float
    tau: float
    job_tau: float = math.nan
    """Rank agreement over pairs of plans for the same job (``MeasuredRun.job_key``)."""
    memory_rows: int = 0
    memory_mean: float = 0.0
    predicted_oom: int = 0
    worst: list[Scored] = field(default_factory=list)


def kendall_tau(scored: list[Scored], same_job: bool = False) -> float:
    """Rank agreement of predicted and measured throughput (tokens/s per GPU) over every pair of rows training the
    same model (same shape and sequence length) on the same device type, measured by the same system — or,
    ``same_job``, over pairs of plans for the same job on the same GPUs; 1: every pair ordered alike."""
    conc = disc = 0
    key = (lambda r: r.job_key) if same_job else (lambda r: r.model_key)
    for i, a in enumerate(scored):
        for b in scored[i + 1:]:
            if key(a.run) != key(b.run) or (a.run.device, a.run.measured_by) != (b.run.device, b.run.measured_by):
                continue
            m = _per_gpu(a.run, a.run.step_time_s) - _per_gpu(b.run, b.run.step_time_s)
            p = _per_gpu(a.run, a.step_time_s) - _per_gpu(b.run, b.step_time_s)
            if m == 0 or p == 0:
                continue
            conc, disc = (conc + 1, disc) if (m > 0) == (p > 0) else (conc, disc + 1)
    return (conc - disc) / (conc + disc) if conc + disc else math.nan


def _per_gpu(r: MeasuredRun, step: float) -> float:
    return r.global_batch * r.seq_len / step / (r.gpus_per_node * r.nodes)


def summarize(scored: list[Scored], worst: int = 3) -> Summary:
    """Mean / median / max |step-time error|, rank agreement, memory error where measured."""
    errs = [abs(s.step_error) for s in scored]
    mem = [abs(e) for s in scored if (e := s.memory_error) is not None]
    return Summary(len(scored), statistics.fmean(errs), statistics.median(errs), max(errs), kendall_tau(scored),
                   kendall_tau(scored, same_job=True),
                   len(mem), statistics.fmean(mem) if mem else 0.0, sum(not s.fits for s in scored),
                   sorted(scored, key=lambda s: -abs(s.step_error))[:worst])


def calibrate_one(runs: list[MeasuredRun], device: str,
                  devices: dict[str, DeviceModel] | None = None) -> tuple[MeasuredRun, DeviceModel]:
    """Calibrate a device type on its one smallest run (fewest GPU-seconds): the measured / predicted step time
    becomes that type's whole-step correction, as a tune's refit writes it (``planner/refit.py``)."""
    mine = [r for r in runs if r.device == device]
    small = min(mine, key=lambda r: r.step_time_s * r.gpus_per_node * r.nodes)
    s = score_run(small, devices)
    base = (devices or {}).get(device) or DeviceModel(device_type(device))
    return small, replace(base, step_scale=(("base", small.step_time_s / s.step_time_s),))
