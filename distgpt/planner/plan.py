"""The Plan: how one training job is sharded. The single contract between planner, engine, orchestrator and checkpoints.

Frozen and JSON-able; no torch import. ``validate`` reports every inconsistency as one clear message each.

Rank order: a string such as ``"tp-dp-pp"`` lists the parallel dimensions from fastest- to slowest-varying global
rank. With ``tp-dp-pp`` the ranks of one tensor-parallel group are consecutive, so on GPUs they share a node.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from distgpt.errors import DistgptError
from distgpt.model.config import GPTConfig

DIMS = ("tp", "dp", "pp")
DpEngine = Literal["ddp", "fsdp", "deepspeed"]
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]


class PlanError(DistgptError, ValueError):
    """A Plan that cannot run; ``problems`` lists each reason with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid plan:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Plan:
    """Degrees of parallelism and everything needed to lay a job onto ranks."""

    dp: int = 1
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel ranks per replica (Megatron column/row split; heads and vocabulary divided)."""
    pp: int = 1
    """Pipeline stages per replica."""
    rank_order: str = "tp-dp-pp"
    """Parallel dimensions from fastest- to slowest-varying rank."""
    stage_layers: tuple[int, ...] = ()
    """Blocks per pipeline stage, e.g. (3, 1); empty: as even as possible. With interleaving: per virtual stage."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B needs ≥ 2)."""
    stage_devices: tuple[str, ...] = ()
    """Device type serving each pipeline stage (informational for the engine; used by placement)."""
    replica_devices: tuple[str, ...] = ()
    """Device type of each data-parallel replica."""
    micro_batch_size: int = 0
    """Samples per forward/backward per replica; the rest of its share is gradient accumulation (0: the whole share
    at once). The Plan owns it: a job sets it as ``[plan] micro_batch_size``."""
    batch_shares: tuple[int, ...] = ()
    """Samples per optimizer step for each replica; uneven for mixed device types. Empty: even split."""
    dp_engine: DpEngine = "ddp"
    """How replicas share gradients: DDP all-reduce, FSDP2 sharding, or DeepSpeed ZeRO."""
    zero_stage: int = 0
    """ZeRO stage for dp_engine='deepspeed' (1: optimizer states, 2: + gradients, 3: + parameters)."""
    recompute: bool = False
    """Activation recomputation: keep only block inputs, recompute the rest in backward."""
    compile: bool = False
    """torch.compile each transformer block (regional, as torchtitan does): the same numbers from fused kernels —
    a large gain on GPUs, none on a few CPU cores; the first steps wait for the compiler."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Compute precision: fp32, or bf16 (autocast with fp32 master weights; FSDP2 also gathers parameters in bf16,
    DeepSpeed runs its bf16 mode). The one place precision is set."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule (only with pp > 1)."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """Free text from the planner (why this plan); ignored by the engine."""

    @property
    def world_size(self) -> int:
        """Ranks this plan needs."""
        return self.dp * self.tp * self.pp

    def shares(self, global_batch: int) -> list[int]:
        """Per-replica samples per step: ``batch_shares`` or an even split of ``global_batch``."""
        if self.batch_shares:
            return list(self.batch_shares)
        return [global_batch // self.dp] * self.dp

    def num_micro_batches(self, global_batch: int) -> list[int]:
        """Micro-batches per step of each replica (its share over micro_batch_size; 1 when unset)."""
        return [s // (self.micro_batch_size or s) for s in self.shares(global_batch)]

    def layer_ranges(self, n_layer: int) -> list[tuple[int, int]]:
        """[start, end) block indices of each (virtual) stage, in pipeline order."""
        n = self.pp * self.virtual_stages
        counts = list(self.stage_layers) or [n_layer // n + (1 if i < n_layer % n else 0) for i in range(n)]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [(s, s + c) for s, c in zip(starts, counts, strict=True)]

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension."""
        out, rest = {}, rank
        for dim in self.rank_order.split("-"):
            size = getattr(self, dim)
            out[dim], rest = rest % size, rest // size
        return out

    def rank_of(self, **coords: int) -> int:
        """The global rank at the given coordinates (the inverse of ``coords``)."""
        rank, stride = 0, 1
        for dim in self.rank_order.split("-"):
            rank += coords[dim] * stride
            stride *= getattr(self, dim)
        return rank

    def describe(self) -> str:
        """One readable line."""
        parts = [f"dp{self.dp}({self.dp_engine}{f' zero{self.zero_stage}' if self.dp_engine == 'deepspeed' else ''})",
                 f"tp{self.tp}", f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(f"{self.schedule} layers={list(self.stage_layers) or 'even'}")
        if self.batch_shares:
            parts.append(f"shares={list(self.batch_shares)}")
        if self.recompute:
            parts.append("recompute")
        if self.compile:
            parts.append("compiled")
        return " ".join(parts) + f" mb={self.micro_batch_size or 'auto'} {self.dtype}"

    def to_json(self) -> str:
        """JSON text (round-trips through ``from_json``)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of ``to_json``."""
        d: dict[str, Any] = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def problems(self, model: GPTConfig, world_size: int | None = None, global_batch: int | None = None) -> list[str]:
        """Every reason this plan cannot train ``model`` on ``world_size`` ranks with ``global_batch`` samples."""
        return _check(self, model, world_size, global_batch)

    def validate(self, model: GPTConfig, world_size: int | None = None, global_batch: int | None = None) -> None:
        """Raise PlanError listing every problem (see ``problems``)."""
        p = self.problems(model, world_size, global_batch)
        if p:
            raise PlanError(p)


def _check(plan: Plan, m: GPTConfig, world: int | None, batch: int | None) -> list[str]:
    p: list[str] = []
    for dim in DIMS:
        if getattr(plan, dim) < 1:
            p.append(f"{dim}: must be ≥ 1, got {getattr(plan, dim)}")
    if sorted(plan.rank_order.split("-")) != sorted(DIMS):
        p.append(f"rank_order: {plan.rank_order!r} must name tp, dp and pp once each, e.g. 'tp-dp-pp'")
    if p:
        return p
    if world is not None and plan.world_size != world:
        p.append(f"dp×tp×pp = {plan.dp}×{plan.tp}×{plan.pp} = {plan.world_size} ranks, but the job has {world} — "
                 f"change the degrees or the number of workers")
    p += _check_tp(plan, m) + _check_pp(plan, m) + _check_dp(plan)
    if batch is not None:
        p += _check_batch(plan, batch)
    return p


def _check_tp(plan: Plan, m: GPTConfig) -> list[str]:
    p = []
    if plan.tp > 1:
        if m.n_head % plan.tp:
            p.append(f"tp: {plan.tp} does not divide n_head={m.n_head} — pick tp among its divisors")
        if m.vocab_size % plan.tp:
            p.append(f"tp: {plan.tp} does not divide vocab_size={m.vocab_size} — pad model.vocab_size to a multiple")
        if (m.ffn_mult * m.n_embd) % plan.tp:
            p.append(f"tp: {plan.tp} does not divide the MLP width {m.ffn_mult * m.n_embd}")
    return p


def _check_pp(plan: Plan, m: GPTConfig) -> list[str]:
    p = []
    n_chunks = plan.pp * plan.virtual_stages
    if plan.schedule == "interleaved-1f1b" and plan.pp > 1 and plan.virtual_stages < 2:
        p.append("schedule: interleaved-1f1b needs virtual_stages ≥ 2 — set plan.virtual_stages=2 or use 1f1b")
    if plan.schedule != "interleaved-1f1b" and plan.virtual_stages != 1:
        p.append(f"virtual_stages: {plan.virtual_stages} needs schedule='interleaved-1f1b'")
    if plan.stage_layers:
        if len(plan.stage_layers) != n_chunks:
            p.append(f"stage_layers: {len(plan.stage_layers)} entries for {n_chunks} stages — give one count per stage")
        elif sum(plan.stage_layers) != m.n_layer or min(plan.stage_layers) < 1:
            p.append(f"stage_layers: {list(plan.stage_layers)} must be ≥ 1 each and sum to n_layer={m.n_layer}")
    elif n_chunks > m.n_layer:
        p.append(f"pp: {n_chunks} stages for {m.n_layer} layers — every stage needs at least one block")
    for name, n, want in (("stage_devices", len(plan.stage_devices), plan.pp),
                          ("replica_devices", len(plan.replica_devices), plan.dp)):
        if n and n != want:
            p.append(f"{name}: {n} entries, expected {want} (or none)")
    return p


def _check_dp(plan: Plan) -> list[str]:
    p = []
    if plan.dp_engine == "deepspeed":
        if plan.zero_stage not in (1, 2, 3):
            p.append(f"zero_stage: {plan.zero_stage} — DeepSpeed ZeRO stages are 1, 2 or 3")
        if plan.tp > 1 or plan.pp > 1:
            p.append("dp_engine: 'deepspeed' composes with neither tp nor pp here — use dp_engine='fsdp' (tp) or "
                     "'ddp' (pp), or set tp=pp=1")
    elif plan.zero_stage:
        p.append(f"zero_stage: {plan.zero_stage} applies only to dp_engine='deepspeed' (FSDP2 always shards fully)")
    if plan.compile and (plan.dp_engine == "deepspeed" or plan.pp > 1):
        # not refused for a reason of principle: neither composition has been run and checked against one process
        p.append("compile: with " + ("dp_engine='deepspeed'" if plan.dp_engine == "deepspeed" else "pipeline stages")
                 + " it is not supported yet — set plan.compile=false, or use ddp / fsdp without pp")
    return p


def _check_batch(plan: Plan, batch: int) -> list[str]:
    p = []
    shares = plan.shares(batch)
    if plan.batch_shares:
        if len(shares) != plan.dp or sum(shares) != batch or min(shares) < 1:
            p.append(f"batch_shares: {shares} must have dp={plan.dp} entries ≥ 1 summing to the global batch {batch}")
            return p
        if plan.dp_engine == "deepspeed" and len(set(shares)) > 1:
            p.append("batch_shares: DeepSpeed needs equal shares — use dp_engine='ddp' or 'fsdp' for uneven ones")
    elif batch % plan.dp:
        p.append(f"train.global_batch_size: {batch} does not split evenly over dp={plan.dp} — change either, "
                 f"or give plan.batch_shares")
        return p
    mb = plan.micro_batch_size
    if mb < 0:
        p.append(f"micro_batch_size: must be ≥ 0 (0: the whole share at once), got {mb}")
    elif mb and any(s % mb for s in shares):
        p.append(f"micro_batch_size: {mb} must divide every replica's share {shares}")
    elif plan.pp > 1:
        n_micro = [s // (mb or s) for s in shares]
        if min(n_micro) < plan.pp and plan.schedule != "gpipe":
            p.append(f"micro_batch_size: {plan.schedule} needs at least pp={plan.pp} micro-batches per step, "
                     f"got {min(n_micro)} — lower plan.micro_batch_size")
    return p
