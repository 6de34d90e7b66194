"""Execute a ``StaticDecoder`` eagerly or through torch.compile, graphs built once and reused for every token.

Compiled here means ``torch.compile``, prefill and decode compiled separately, rather than torch.export +
AOTInductor. Both were candidates; this one because it keeps an artifact data-only — an AOTInductor package is a
shared library, and loading one runs its code, which is exactly what distgpt refuses to do with a checkpoint — and it
compiles for the machine that runs it (CPU ISA, GPU architecture) instead of the one that exported. Inductor's
on-disk cache makes the second start on a machine fast.

Shapes: the cache is static (``decoder``), the lengths that vary are symbolic. Prefill takes the prompt padded to a
multiple of 16; decode takes the rows in use (padded to a power of two) and a key span — the positions reached,
rounded up to 64 — so attention reads only the part of the cache in use (at 8 rows and a 512 block, reading the
whole block cost more than the weights: 21.5 vs 18.9 ms a step at position 300, 14.8 vs 13.5 at 70, for bucketed
static spans vs this). Compiled with ``dynamic=True`` that is three graphs in all (prefill; decode for one row and
for more), built at warm-up; none is added per token or per prompt (``graphs_compiled`` counts them).

Options (measured on 10–15M-parameter models, 2 CPU cores): ``freezing`` folds the fixed weights into the graph as
constants (prepacked for the CPU GEMM), so a runner serves the weights it was built with; guards on module state are
skipped (they cost ~0.4 ms of a ~7 ms fp32 step and ~2 ms with int8 tensors) — safe because each runner compiles its
own copy of the code (``_own_code``): torch.compile keeps its graphs per code object, and without guards two runners
of the same code would share one graph (found when fp32 and int8 ran in one process); ``max_autotune`` (export
``--autotune``) lets Inductor benchmark its own GEMM templates against the library's (no faster here, twice the
compile time). Tried and not used: ``cpp_wrapper`` (10.6 vs 9.0 ms a batch-1 step of a 15M model, twice the compile).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Literal

import torch

from distgpt.infer.decoder import StaticDecoder
from distgpt.model.gpt import GPT

Engine = Literal["eager", "compiled"]


@dataclass(frozen=True)
class EngineSpec:
    """How a model is executed for inference (stored in an artifact's config.json under ``inference``)."""

    engine: Engine = "compiled"
    """eager: the static-cache decoder run op by op; compiled: the same through torch.compile."""
    max_batch: int = 8
    """Cache slots: the most requests decoded together."""
    autotune: bool = False
    """Let the compiler benchmark its own matrix-multiply kernels (slower to compile, faster to run)."""
    quantize: Literal["none", "int8", "w8a8"] = "none"
    """int8: weight-only int8 Linears (torchao); w8a8: int8 weights and per-row int8 activations (``torch._int_mm``,
    CPU only; ``model.quant`` says why it is the fast one there)."""

    def problems(self) -> list[str]:
        """What is wrong with this spec, each with the fix."""
        out = []
        if self.engine not in ("eager", "compiled"):
            out.append(f"engine must be eager or compiled, got {self.engine!r}")
        if not 1 <= self.max_batch <= 1024:
            out.append(f"max_batch must be between 1 and 1024, got {self.max_batch}")
        if self.quantize not in ("none", "int8", "w8a8"):
            out.append(f"quantize must be none, int8 or w8a8, got {self.quantize!r}")
        return out


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` up to ``limit``, and ``limit`` itself: the shapes graphs are compiled for."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (its own counter): a recompile shows up here."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _own_code(method):
    """``method`` rebound to a private copy of its code object, so torch.compile's cache for it is this runner's."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(method.__self__):x}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


class Runner:
    """Prefill one cache slot, or decode one token for every row up to the highest slot in use."""

    def __init__(self, model: GPT, spec: EngineSpec):
        self.spec = spec
        self.decoder = StaticDecoder(model, spec.max_batch)
        self.device = next(model.parameters()).device
        if spec.quantize == "w8a8" and self.device.type != "cpu":
            # torch._int_mm on CUDA wants more than 16 rows; a decode step has one per request
            raise ValueError("w8a8 runs on CPU only — on a GPU export with --quantize int8 (or none)")
        cfg = model.cfg
        self.block_size = cfg.block_size
        self.vocab_size = cfg.vocab_size
        self.batch_buckets = buckets(spec.max_batch)
        # Symbolic lengths (module doc): a graph per prompt-length bucket cost a 20 s compile on the first long
        # prompt a server saw.
        self.prompt_multiple = min(16, cfg.block_size)
        self.span_multiple = min(64, cfg.block_size)
        self._prefill, self._decode = self.decoder.prefill, self.decoder.decode
        if spec.engine == "compiled":
            options = {"freezing": True, "max_autotune": spec.autotune,
                       "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self._prefill = torch.compile(_own_code(self.decoder.prefill), dynamic=True, options=options)
            self._decode = torch.compile(_own_code(self.decoder.decode), dynamic=True, options=options)

    @staticmethod
    def _fit(n: int, sizes: list[int]) -> int:
        return next(s for s in sizes if s >= n)

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Write ``ids`` into cache slot ``slot``; the logits (V,) for the token after them."""
        if not 0 < len(ids) < self.block_size:
            raise ValueError(f"a prompt needs 1 to {self.block_size - 1} tokens, got {len(ids)}")
        m = self.prompt_multiple
        width = min(-(-len(ids) // m) * m, self.block_size)
        tokens = torch.zeros(1, width, dtype=torch.long, device=self.device)
        tokens[0, : len(ids)] = torch.tensor(ids, device=self.device)
        slot_t = torch.tensor(slot, device=self.device)
        return self._prefill(tokens, slot_t, torch.tensor(len(ids), device=self.device))[0]

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` at ``positions[i]`` to row i (rows beyond the lists are idle); logits (len, V)."""
        n = len(tokens)
        rows = self._fit(n, self.batch_buckets)
        tok = torch.zeros(rows, dtype=torch.long)
        pos = torch.zeros(rows, dtype=torch.long)
        tok[:n], pos[:n] = torch.tensor(tokens), torch.tensor(positions)
        span = min(self.block_size, -(-(max(positions) + 1) // self.span_multiple) * self.span_multiple)
        keys = self.decoder.positions[:span]
        return self._decode(tok.to(self.device), pos.to(self.device), keys)[:n]

    def warmup(self, batches: list[int] | None = None, prompt_lengths: list[int] | None = None) -> None:
        """Build the graphs for these decode batch sizes and prompt lengths now, not on a user's first request
        (compiled, ``[1, 2]`` and one length build every graph there is)."""
        for length in prompt_lengths or [1]:
            self.prefill(0, [0] * min(length, self.block_size - 1))
        for b in batches or [1]:
            self.decode([0] * b, [0] * b)
