"""Memory and time of one training step, as pure functions whose terms stay visible.

Notation: s sequence length, b micro-batch size, h hidden size, a heads, L layers, V vocabulary, t / p / d the tensor-,
pipeline- and data-parallel degrees, m micro-batches per step.

Memory (bytes per device)
  * model states, mixed-precision Adam as this engine runs it: fp32 weights 4, gradients 4, Adam moments 8 bytes per
    parameter; ZeRO-1 divides the 8 by d, ZeRO-2 also the 4 of gradients, ZeRO-3 / FSDP2 all 16 (Rajbhandari 2020).
  * activations per layer per micro-batch, counted as Korthikanti et al. (2022) count them, for this model's Block
    as it saves them (``layer_activation_bytes``: 40·s·b·h bytes in bf16, 64 in fp32, with flash attention and no
    dropout; + 4·a·s²·b without flash); full recomputation keeps only each layer's input; under bf16 autocast DDP
    also keeps bf16 copies of the weights. A 1F1B stage i holds min(p − i, m) micro-batches in flight, GPipe all m
    (Narayanan et al. 2021).
  * the last stage's logits and their gradient: 2 · s·b·V/t · 4 bytes; plus the device's runtime overhead.
Time (seconds per step)
  * compute: on GPUs, the layer-time model of ``planner/efficiency.py`` (GEMMs at an efficiency that falls with
    narrow or short matrices, attention, memory-bound element-wise work, a fixed cost per layer — fitted to published
    runs); with a measured profile (CPU slots, or ``distgpt bench hardware`` on a GPU node), 6·N_layer + 12·s·h FLOPs
    per token per layer at the measured FLOP/s for that micro-batch. ×4/3 with recomputation.
  * tensor parallel: 4 all-reduces of s·b·h per layer per micro-batch (2 forward, 2 backward), each a bandwidth term
    2(t−1)/t · bytes / bw plus the library's latency (``planner/collectives.py``); not overlapped.
  * pipeline: (m + p − 1) · slowest stage time (the bubble is the p − 1 term) plus stage-to-stage sends.
  * data parallel: all-reduce of the gradients, 2(d−1)/d · bytes / slowest link (NVLink / PCIe inside a node, the
    node's NICs across nodes) plus the library's latency per message (per 25 MiB DDP bucket, per layer for FSDP2 /
    ZeRO-3; NCCL's tuner model on GPUs, ring or tree: ``planner/collectives.py``), overlapped with backward only by
    engines that overlap it (DDP, FSDP2, ZeRO-3; not ZeRO-1/2, not the all-reduce after a pipeline schedule);
    FSDP2 / ZeRO-3 also all-gather parameters (bf16 under bf16) every micro-batch.
  * optimizer: Adam streams ~28 bytes per local parameter through device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from distgpt.model.config import GPTConfig
from distgpt.model.presets import layer_params
from distgpt.planner.collectives import Hops, allgather, allreduce, library_hops, send
from distgpt.planner.efficiency import Efficiency, efficiency_for, head_seconds, layer_seconds
from distgpt.planner.hardware import DeviceType

WEIGHT_B, GRAD_B, ADAM_B = 4, 4, 8
SATURATION_TOKENS = 256  # tokens per micro-batch at which an uncalibrated device reaches half its efficiency


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, tokens per step, precision."""

    model: GPTConfig
    global_batch: int
    seq_len: int
    dtype: str = "bf16"
    flash_attention: bool | None = None
    """Whether attention stores the T×T scores (False) or not (True); None: as the device type does."""

    def flash(self, device: DeviceType) -> bool:
        """Flash attention on ``device`` for this job."""
        return device.flash_attention if self.flash_attention is None else self.flash_attention

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4


@dataclass(frozen=True)
class DeviceModel:
    """A device as the cost model sees it: catalog figures, or a calibrated profile's measurements."""

    device: DeviceType
    achieved_flops: float = 0.0
    """Measured FLOP/s of transformer layers (0: peak × efficiency)."""
    intra_bw: float = 0.0
    latency: float = 0.0
    """Measured per-hop latency of a collective, seconds (a profile); 0: the library's model (NCCL's on GPUs)."""
    comm_overlap: float = 0.8
    """Share of a gradient reduction hidden behind backward compute (0 where compute and comm share cores)."""
    act_scale: float = 1.0
    """Measured / modelled activation memory (calibration); 1.0 uncalibrated."""
    overhead_bytes: float = -1.0
    flops_curve: tuple[tuple[float, float], ...] = ()
    """Measured (tokens per micro-batch, FLOP/s) points; interpolated, flat beyond the measured range."""
    engine_time: tuple[tuple[str, float], ...] = ()
    """Measured software cost of each parallel mechanism ('ddp', 'fsdp', 'zero1'..'zero3', 'tp', 'pp'), in seconds
    per micro-batch per local layer: hooks, copies and small collectives the FLOP and bandwidth terms miss."""
    engine_memory: tuple[tuple[str, float], ...] = ()
    """Measured extra resident bytes per rank of each mechanism (its buffers and libraries)."""
    engine_step_time: tuple[tuple[str, float], ...] = ()
    """The part of a mechanism's software cost paid once per optimizer step rather than per micro-batch (FSDP's and
    ZeRO-3's gradient reduce-scatter and shard bookkeeping), in seconds per local layer."""

    efficiency: Efficiency | None = None
    """Figures of the layer-time model for this device (``planner/efficiency.py``); None: its type's fitted ones."""
    step_scale: tuple[tuple[str, float], ...] = ()
    """Measured / modelled step time of plans using each mechanism ('base': every plan), multiplied together over
    a plan's mechanisms — fitted from real runs by ``distgpt tune`` (``planner/refit.py``); 1 where unmeasured."""

    def time_scale(self, keys: list[str]) -> float:
        """The measured correction of a whole step for a plan with the mechanisms in ``keys``."""
        s = dict(self.step_scale)
        out = 1.0
        for k in keys:
            out *= s.get(k, 1.0)
        return out

    def engine_cost(self, keys: list[str]) -> tuple[float, float]:
        """(seconds per micro-batch per layer, bytes) the mechanisms in ``keys`` add on this device."""
        t, m = dict(self.engine_time), dict(self.engine_memory)
        return sum(t.get(k, 0.0) for k in keys), sum(m.get(k, 0.0) for k in keys)

    def engine_step_cost(self, keys: list[str]) -> float:
        """Seconds per optimizer step per local layer the mechanisms in ``keys`` add on this device."""
        t = dict(self.engine_step_time)
        return sum(t.get(k, 0.0) for k in keys)

    def flops(self, dtype: str, tokens: float = 0.0) -> float:
        """FLOP/s of transformer layers at ``tokens`` per micro-batch."""
        if self.flops_curve:
            return interpolate(self.flops_curve, tokens)
        if self.achieved_flops:
            return self.achieved_flops
        # Uncalibrated: GEMMs need enough rows to fill the device; efficiency saturates as tokens grow
        # (half of its ceiling at SATURATION_TOKENS tokens per micro-batch).
        ramp = tokens / (tokens + SATURATION_TOKENS) if tokens else 1.0
        return self.device.peak(dtype) * self.device.efficiency * ramp

    @property
    def compute(self) -> Efficiency | None:
        """The layer-time model's figures, or None where only measured FLOP/s apply (a profile, or a CPU slot)."""
        if self.flops_curve or self.achieved_flops:
            return None
        return self.efficiency or efficiency_for(self.device.name)

    @cached_property  # asked for on every stage of every candidate: ~70k times a search
    def hops(self) -> Hops:
        """The collective library's latencies on this device (``planner/collectives.py``)."""
        return library_hops(self.device, self.latency)

    @property
    def link_bw(self) -> float:
        return self.intra_bw or self.device.intra_node_bw

    @property
    def overhead(self) -> float:
        return self.overhead_bytes if self.overhead_bytes >= 0 else self.device.runtime_overhead_bytes


def engine_keys(engine: str, zero: int, dp: int, tp: int, pp: int) -> list[str]:
    """Names of the parallel mechanisms a plan uses (what calibration measures separately)."""
    keys = []
    if dp > 1:
        keys.append(f"zero{zero}" if engine == "deepspeed" else engine)
    elif engine == "deepspeed":
        keys.append(f"zero{zero}")
    if tp > 1:
        keys.append("tp")
    if pp > 1:
        keys.append("pp")
    return keys


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear y(x) through ``points``, constant outside them."""
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def stage_params(m: GPTConfig, n_layers: int, first: bool, last: bool, tp: int, pp: int) -> float:
    """Parameters one device of a stage holds (matrices and the column-split biases cut t ways; LayerNorms and the
    row-split layers' biases whole on every tensor-parallel rank; a tied head is a second copy when p > 1)."""
    bias = 1 if m.bias else 0
    whole = 2 * (m.n_embd + m.n_embd * bias) + 2 * m.n_embd * bias  # per block: 2 LayerNorms, 2 output biases
    n = n_layers * ((layer_params(m) - whole) / tp + whole)
    if first:
        n += m.vocab_size * m.n_embd / tp + (m.block_size * m.n_embd if m.pos_encoding == "learned" else 0)
    if last:
        n += m.n_embd + m.n_embd * bias  # the final LayerNorm
        if not m.tie_embeddings or (pp > 1 and not first):
            n += m.vocab_size * m.n_embd / tp
    return n


def state_bytes(params: float, engine: str, zero: int, dp: int, pp: int = 1) -> float:
    """Weights + gradients + Adam moments per device under the data-parallel engine, at the step's peak.

    FSDP2 inside pipeline stages keeps each stage's blocks gathered, and their gradients unsharded, from the first
    micro-batch to the last backward (the schedule's no-sync accumulation): the full weights and gradients beside
    the sharded master weights and Adam moments."""
    if engine == "fsdp" and pp > 1 and dp > 1:
        return params * (WEIGHT_B * (1 + 1 / dp) + GRAD_B + ADAM_B / dp)
    if engine == "fsdp" or zero == 3:
        return params * (WEIGHT_B + GRAD_B + ADAM_B) / dp
    if zero == 2:
        return params * (WEIGHT_B + (GRAD_B + ADAM_B) / dp)
    if zero == 1:
        return params * (WEIGHT_B + GRAD_B + ADAM_B / dp)
    return params * (WEIGHT_B + GRAD_B + ADAM_B)


def setup_bytes(m: GPTConfig, params: float, engine: str, zero: int, dp: int) -> float:
    """Device memory while a rank sets its part up: the weights it keeps (sharded ones by its shard; DeepSpeed takes
    the whole stage before partitioning), plus the one full tensor being made at a time (the largest: the
    embedding or an MLP matrix) before its shard is cut from it (``parallel/materialize.py``)."""
    largest = max(m.vocab_size, m.ffn_mult * m.n_embd) * m.n_embd
    kept = params / dp if engine == "fsdp" else params
    return kept * WEIGHT_B + largest * WEIGHT_B


def layer_activation_bytes(w: Workload, b: int, tp: int, recompute: bool, flash: bool) -> float:
    """Bytes one layer keeps for backward, one micro-batch of b samples, as distgpt's Block saves them.

    Counted per element of s·b·h, the way Korthikanti et al. (2022) count them, for this model (measured on CPU with
    saved-tensor hooks: ``tests/unit/test_plan_accuracy.py``): the two LayerNorm inputs are the fp32 residual
    stream (8 bytes, also under bf16 autocast); the first LayerNorm's output as the q/k/v projections' input (fp32: one
    tensor, 4; bf16: autocast casts it once per projection, 3 × 2); q, k, v; the attention output (which the output
    projection reads); the second LayerNorm's output as fc1's input; the GELU's input and output (ffn wide). Only
    q, k, v, the attention output and the ffn tensors are split t ways under tensor parallelism. Without flash
    attention the softmax probabilities (fp32, a·s² per sample) are kept too; with dropout, its two masks.
    Recomputation keeps only each layer's input (the fp32 residual)."""
    s, h, a = w.seq_len, w.model.n_embd, w.model.n_head
    x = w.act_bytes
    if recompute:
        return 4 * s * b * h
    whole = 8 + (3 * x if x == 2 else x) + x + (2 if w.model.dropout > 0 else 0)
    split = 3 * x + x + 2 * w.model.ffn_mult * x + (0 if flash else 4 * a * s / h)
    return s * b * h * (whole + split / tp)


def autocast_weight_bytes(params: float, engine: str, dtype: str) -> float:
    """bf16 copies of the weights that autocast makes in forward and the matmuls keep for backward (2 bytes per
    local parameter); FSDP2 gathers bf16 weights, which autocast uses as they are (measured on CPU: 2.00 B/param)."""
    return 2 * params if dtype == "bf16" and engine == "ddp" else 0.0


def logits_bytes(w: Workload, b: int, tp: int) -> float:
    """The last stage's fp32 logits and their gradient."""
    return 2 * w.seq_len * b * w.model.vocab_size / tp * 4


def in_flight(schedule: str, stage: int, pp: int, n_micro: int) -> int:
    """Micro-batches whose activations a stage holds at peak."""
    return n_micro if schedule == "gpipe" else min(pp - stage, n_micro)


def layer_time(w: Workload, dev: DeviceModel, b: int, tp: int, recompute: bool, *, tp_bw: float = 0.0,
               tp_nodes: int = 1) -> float:
    """Forward + backward time of one layer for one micro-batch, compute and TP communication (over the device's
    link inside a node; ``tp_bw`` and ``tp_nodes`` where a tensor-parallel group spans nodes)."""
    tokens = b * w.seq_len
    m = w.model
    eff = dev.compute
    if eff is not None:
        t = layer_seconds(eff, dev.device.peak(w.dtype), dev.device.mem_bw, tokens=tokens, seq=w.seq_len,
                          width=m.n_embd, ffn=m.ffn_mult * m.n_embd, heads=m.n_head, tp=tp,
                          act_bytes=w.act_bytes, recompute=recompute, flash=w.flash(dev.device))
    else:
        flops = tokens * (6 * layer_params(m) + 12 * m.n_embd * w.seq_len) / tp
        if recompute:
            flops *= 4 / 3
        t = flops / dev.flops(w.dtype, tokens)
    if tp > 1:
        n_ar = 6 if recompute else 4
        t += n_ar * allreduce(tokens * m.n_embd * w.act_bytes, tp, tp_nodes, tp_bw or dev.link_bw, dev.hops)
    return t


def head_time(w: Workload, dev: DeviceModel, b: int, tp: int) -> float:
    """LM head forward + backward for one micro-batch."""
    tokens = b * w.seq_len
    eff = dev.compute
    if eff is not None:
        return head_seconds(eff, dev.device.peak(w.dtype), dev.device.mem_bw, tokens=tokens, width=w.model.n_embd,
                            vocab=w.model.vocab_size, tp=tp)
    return tokens * 6 * w.model.vocab_size * w.model.n_embd / tp / dev.flops(w.dtype, tokens)


def p2p_time(w: Workload, b: int, bw: float, hops: Hops, across_nodes: bool = False) -> float:
    """One stage boundary, one micro-batch: activations forward and their gradients backward."""
    return 2 * send(b * w.seq_len * w.model.n_embd * w.act_bytes, bw, hops, across_nodes)


DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb: one all-reduce per bucket


def engine_overlap(engine: str, zero: int, pp: int, overlap: float) -> float:
    """How much of the gradient reduction the engine can hide behind backward: DDP's buckets and FSDP2's per-layer
    reduce-scatters run during backward; DeepSpeed ZeRO-1/2 reduce after it (``overlap_comm`` is off by default
    below stage 3, and distgpt leaves it so); pipeline stages all-reduce after the whole schedule (``parallel/pp.py``).
    """
    if engine == "deepspeed" and zero < 3:
        return 0.0
    if pp > 1 and engine == "ddp":
        return 0.0
    return overlap


def dp_time(params: float, engine: str, zero: int, dp: int, bw: float, hops: Hops, n_micro: int,
            backward_last: float, compute_micro: float, overlap: float, pp: int = 1, *, layers: int = 1,
            gather_bytes: float = WEIGHT_B, nodes: int = 1) -> float:
    """Exposed data-parallel communication per step, the replicas spread over ``nodes`` nodes.

    Each collective pays the library's latency once per call, so many small messages cost more than one large one:
    DDP sends one all-reduce per 25 MiB bucket, FSDP2 / ZeRO-3 one all-gather per layer forward and backward (at
    ``gather_bytes`` per parameter: bf16 under bf16 mixed precision) and one reduce-scatter per layer. FSDP2 inside
    pipeline stages gathers once per step, not once per micro-batch (see ``state_bytes``)."""
    if dp <= 1:
        return 0.0
    overlap = engine_overlap(engine, zero, pp, overlap)
    grads = params * GRAD_B
    if engine == "fsdp" and pp > 1:
        n_micro = 1
    if engine == "fsdp" or zero == 3:
        layers = max(1, layers)
        gather = 2 * layers * allgather(params * gather_bytes / layers, dp, nodes, bw, hops)  # forward + backward
        per_micro = max((1 - overlap) * gather, gather - overlap * compute_micro)
        reduce = layers * allgather(grads / layers, dp, nodes, bw, hops)
        return n_micro * per_micro + max((1 - overlap) * reduce, reduce - overlap * backward_last)
    buckets = max(1, math.ceil(grads / DDP_BUCKET_BYTES)) if engine == "ddp" else 1
    comm = buckets * allreduce(grads / buckets, dp, nodes, bw, hops)
    return max((1 - overlap) * comm, comm - overlap * backward_last)


def optimizer_time(params: float, dev: DeviceModel) -> float:
    """Adam reads weights, gradients and two moments and writes three of them: ~28 bytes per parameter."""
    return params * 28 / dev.device.mem_bw
