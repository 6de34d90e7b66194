"""How fast a GPU runs one transformer layer, as the work per device shapes it. Pure: no torch.

A datasheet peak times one efficiency says a 125M model and a 70B model run at the same fraction of peak; measured
runs say otherwise (GPT-style models on A100s: 42% MFU at 125M, 64% at 3B, in the same framework). The time of one
layer's forward + backward for one micro-batch is modelled as the sum of what bounds each part:

* GEMMs (the 6·N FLOPs per token): at ``gemm`` × peak for wide matrices, lower for narrow ones — the efficiency
  halves at a width of ``width_half``, a weight's width being the harmonic mean of its two sides as one
  tensor-parallel rank holds it (``gemm_seconds``) — and for short ones: it halves at ``ROWS_HALF`` rows (tokens per
  micro-batch), the row height of the tensor-core tiles GEMM libraries use;
* attention's T×T products (12·s·h FLOPs per token, counted in full as MFU does): at ``attention`` × peak;
* element-wise work (LayerNorms, GELU, residual adds, dropout, casts): memory-bound, ``memory_passes`` bytes moved per
  activation element of width h + ffn/tp, at the datasheet memory bandwidth;
* a fixed ``kernel_s`` per layer per micro-batch (kernel launches and small synchronisations), which dominates when
  the micro-batch is small.

Recomputation repeats the forward: every term × 4/3. Without flash attention the T×T scores are also written and
read back (``SCORE_PASSES``, not fitted: every run the figures are fitted to uses flash attention).

The figures are fitted (``distgpt bench plan-accuracy --table … --fit``, ``planner/accuracy.py``) to the rows marked
``fit`` of ``planner/data/published_runs.csv``: the llm-foundry MPT training benchmarks on one node of 8 GPUs
(mosaicml/llm-foundry, scripts/train/benchmarking/README.md, tables "H100 80GB BF16" and "A100 80GB …"). Every
multi-node row and every A100-40GB row is held out. A device type without its own fit gets ``GENERIC`` (one set
fitted to both types at once), which is what "uncalibrated" means for it; ``distgpt bench hardware`` or a tune
replaces it with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

ROWS_HALF = 128.0
"""Tokens per micro-batch at which GEMM efficiency halves (not fitted: every fitted run has 2,048 tokens or more;
128 is the tile height of cuBLAS / CUTLASS tensor-core kernels, so fewer rows leave most of each tile idle)."""
SCORE_PASSES = 8.0
"""Bytes moved per score element (× activation bytes) without flash attention: written, softmaxed, read for the
value product, and the same again in backward."""
LOGIT_PASSES = 16.0
"""Bytes per logit of the LM head's cross-entropy: fp32 logits written, read by log-softmax, gradient written and
read back by the head's backward GEMMs."""


@dataclass(frozen=True)
class Efficiency:
    """Fitted figures for one device type (see the module docstring for each term's meaning)."""

    gemm: float
    attention: float
    width_half: float
    memory_passes: float
    kernel_s: float


# Fitted by `distgpt bench plan-accuracy --table distgpt/planner/data/published_runs.csv --fit` (96 single-node
# runs). Mean |error| on those rows, and on the held-out rows, is printed by the same command without --fit.
FITTED: dict[str, Efficiency] = {
    "A100-80GB": Efficiency(gemm=0.840, attention=0.564, width_half=996, memory_passes=6.84, kernel_s=0.0002),
    "H100-SXM": Efficiency(gemm=0.626, attention=0.322, width_half=996, memory_passes=6.84, kernel_s=0.0002),
}
GENERIC = Efficiency(gemm=0.725, attention=0.426, width_half=996, memory_passes=6.84, kernel_s=0.0002)
"""The shared figures with the geometric mean of the fitted types' GEMM and attention efficiencies."""


def efficiency_for(name: str) -> Efficiency | None:
    """The fitted figures of a GPU type, ``GENERIC`` for other GPUs, None for CPU slots (measured profiles only)."""
    if name == "cpu":
        return None
    return FITTED.get(name, GENERIC)


def layer_seconds(eff: Efficiency, peak: float, mem_bw: float, *, tokens: float, seq: int, width: int, ffn: int,
                  heads: int, tp: int, act_bytes: int, recompute: bool, flash: bool) -> float:
    """Forward + backward of one layer for one micro-batch of ``tokens`` tokens on one tensor-parallel rank."""
    # (out, in) of each weight one rank multiplies: q/k/v and fc1 split by columns, the projections by rows
    shapes = ((3 * width / tp, width), (width, width / tp), (ffn / tp, width), (width, ffn / tp))
    attn = 12 * tokens * seq * width / tp
    # LayerNorms and residual adds are on the whole width on every tensor-parallel rank; the ffn activation is split
    elem = eff.memory_passes * tokens * (width + ffn / tp) * act_bytes
    if not flash:
        elem += SCORE_PASSES * tokens * seq * heads / tp * act_bytes
    t = gemm_seconds(eff, peak, tokens, shapes) + attn / (peak * eff.attention) + elem / mem_bw + eff.kernel_s
    return t * (4 / 3 if recompute else 1.0)


def gemm_seconds(eff: Efficiency, peak: float, tokens: float, shapes: tuple[tuple[float, float], ...]) -> float:
    """Forward + backward (6 FLOPs per weight per token) of ``tokens`` rows through weights of the (out, in)
    ``shapes``. A GEMM's width is the harmonic mean 2·out·in / (out + in) of its weight's sides — what its arithmetic
    intensity grows with — so a tensor-parallel split narrows one side of each weight, not the whole layer to h / t
    (4,096 rows through a 7168 × 896 slice still fill an H100's tiles)."""
    rows = tokens / (tokens + ROWS_HALF)
    t = 0.0
    for out, inner in shapes:
        w = 2 * out * inner / (out + inner)
        t += 6 * tokens * out * inner / (peak * eff.gemm * w / (w + eff.width_half) * rows)
    return t


def head_seconds(eff: Efficiency, peak: float, mem_bw: float, *, tokens: float, width: int, vocab: int,
                 tp: int) -> float:
    """The LM head's GEMMs (forward, two backward) and its cross-entropy's memory traffic, one micro-batch."""
    return gemm_seconds(eff, peak, tokens, ((vocab / tp, width),)) + LOGIT_PASSES * tokens * vocab / tp / mem_bw
