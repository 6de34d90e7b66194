"""Fit the layer-time model's figures (``planner/efficiency.py``) to measured runs. Pure Python: the planner's
dependencies stay what they are (no SciPy), and five to nine parameters need nothing more than Nelder–Mead."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from distgpt.planner.accuracy import MeasuredRun, score_run
from distgpt.planner.cost import DeviceModel
from distgpt.planner.efficiency import Efficiency
from distgpt.planner.hardware import device_type

SHARED = ("width_half", "memory_passes")
# kernel_s is not fitted: the published runs use micro-batches of 4k+ tokens, where a fixed cost per layer cannot be
# told apart from a lower GEMM efficiency (fitted freely it becomes a 5 ms catch-all). Its value stays the start's.
PER_DEVICE = ("gemm", "attention")
START = Efficiency(gemm=0.7, attention=0.35, width_half=300.0, memory_passes=30.0, kernel_s=2e-4)
"""Where every fit starts (fixed, so a refit does not depend on the figures it replaces)."""


def nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.3, iters: int = 600,
                tol: float = 1e-7) -> list[float]:
    """Minimise ``f`` from ``x0`` (standard coefficients: reflect 1, expand 2, contract ½, shrink ½)."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        refl = [c + (c - w) for c, w in zip(centroid, worst, strict=True)]
        fr = f(refl)
        if fr < values[0]:
            exp = [c + 2 * (c - w) for c, w in zip(centroid, worst, strict=True)]
            fe = f(exp)
            simplex[-1], values[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, worst, strict=True)]
            fc = f(con)
            if fc < values[-1]:
                simplex[-1], values[-1] = con, fc
            else:  # shrink towards the best point
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (p - b) for b, p in zip(best, pt, strict=True)] for pt in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def _loss(runs: list[MeasuredRun], effs: dict[str, Efficiency]) -> float:
    """Mean squared log-ratio of predicted to measured step time (scale-free: a 10 ms and a 60 s step weigh alike)."""
    total = 0.0
    for r in runs:
        dev = DeviceModel(device_type(r.device), efficiency=effs[r.device])
        total += math.log(score_run(r, {r.device: dev}).step_time_s / r.step_time_s) ** 2
    return total / len(runs)


def fit(runs: list[MeasuredRun], start: Efficiency, per_device: bool = True) -> dict[str, Efficiency]:
    """Figures for each device type in ``runs`` (``per_device``: its own GEMM and attention efficiencies, the rest
    shared), or one set for all of them (``per_device=False``: what a type without its own fit gets)."""
    types = sorted({r.device for r in runs}) if per_device else ["*"]
    names = [*SHARED, *(f"{t}.{k}" for t in types for k in PER_DEVICE)]
    x0 = [math.log(getattr(start, n.split(".")[-1])) for n in names]

    def unpack(x: list[float]) -> dict[str, Efficiency]:
        vals = dict(zip(names, (math.exp(v) for v in x), strict=True))
        shared = {k: vals[k] for k in SHARED}
        out = {t: replace(start, **shared, **{k: min(vals[f"{t}.{k}"], 1.0) for k in PER_DEVICE}) for t in types}
        return out if per_device else {r.device: out["*"] for r in runs}

    best = nelder_mead(lambda x: _loss(runs, unpack(x)), x0)
    return unpack(best)


def generic(fitted: dict[str, Efficiency]) -> Efficiency:
    """What a device type without its own fit gets: the shared figures, and the geometric mean of the fitted types'
    GEMM and attention efficiencies (fitting one set to all types at once trades the width term for the others)."""
    effs = list(fitted.values())
    mean = {k: math.exp(sum(math.log(getattr(e, k)) for e in effs) / len(effs)) for k in PER_DEVICE}
    return replace(effs[0], **mean)
