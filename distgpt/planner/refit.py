"""Measured runs → corrections to the cost model, written back into a hardware profile. Pure: no torch, no Ray.

A tune measures real step times and peak memory of Plans the cost model predicted. What the formulas miss differs
by parallel mechanism (``cost.engine_keys``: ddp, fsdp, zero1..3, tp, pp) and by machine (``base``, which every
plan pays: compute efficiency, the loop, the loader). The correction is multiplicative, so it carries over to other
micro-batch sizes and layer counts of the same mechanisms; for trial i

    log(measured_i / predicted_i) ≈ Σ_k θ_k · [plan i uses mechanism k]

solved for θ by ridge least squares (numpy); the ridge keeps a mechanism seen once from taking all of a residual
that ``base`` shares. The profile stores exp(θ_k) as ``step_scale[k]``; the evaluator multiplies a step by the
factors of its plan's mechanisms. Peak memory is fitted additively (bytes per rank, libraries and buffers) into
``engine_memory[k]``. ``errors`` reports the fit in-sample and leave-one-out, so a profile that only memorised its
trials shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from distgpt.planner.calibrate import DeviceProfile
from distgpt.planner.cost import DeviceModel, engine_keys
from distgpt.planner.hardware import device_type
from distgpt.planner.plan import Plan

BASE = "base"


def plan_keys(plan: Plan) -> tuple[str, ...]:
    """The software-cost terms ``plan`` pays (the cost model's ``engine_keys`` and ``base``)."""
    return (*engine_keys(plan.dp_engine, plan.zero_stage, plan.dp, plan.tp, plan.pp), BASE)


@dataclass(frozen=True)
class Measurement:
    """One measured Plan beside the cost model's prediction for it."""

    keys: tuple[str, ...]
    predicted_s: float
    measured_s: float
    predicted_bytes: float = 0.0
    measured_bytes: float = 0.0


def measurement(plan: Plan, predicted_s: float, measured_s: float, predicted_bytes: float = 0.0,
                measured_bytes: float = 0.0) -> Measurement:
    """A Measurement of ``plan`` (its terms derived from the plan)."""
    return Measurement(plan_keys(plan), predicted_s, measured_s, predicted_bytes, measured_bytes)


@dataclass(frozen=True)
class Corrections:
    """What the fit found, per term: the log of the step-time factor, and bytes per rank to add."""

    time: tuple[tuple[str, float], ...] = ()
    memory: tuple[tuple[str, float], ...] = ()

    def step_time(self, m: Measurement) -> float:
        """The corrected prediction of ``m``'s step time."""
        t = dict(self.time)
        return m.predicted_s * math.exp(sum(t.get(k, 0.0) for k in m.keys))

    def peak_bytes(self, m: Measurement) -> float:
        """The corrected prediction of ``m``'s peak memory per rank."""
        b = dict(self.memory)
        return m.predicted_bytes + sum(b.get(k, 0.0) for k in m.keys)


def _ridge(rows: list[dict[str, float]], y: list[float], ridge: float) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    if not keys:
        return {}
    a = np.array([[r.get(k, 0.0) for k in keys] for r in rows])
    x = np.linalg.solve(a.T @ a + ridge * len(rows) * np.eye(len(keys)), a.T @ np.array(y))
    return {k: float(v) for k, v in zip(keys, x, strict=True)}


def fit(points: list[Measurement], ridge: float = 0.05) -> Corrections:
    """The corrections that best explain ``points`` (empty when there are none)."""
    if not points:
        return Corrections()
    timed = [p for p in points if p.predicted_s > 0 and p.measured_s > 0]
    t = _ridge([dict.fromkeys(p.keys, 1.0) for p in timed], [math.log(p.measured_s / p.predicted_s) for p in timed],
               ridge) if timed else {}
    mem = [p for p in points if p.measured_bytes > 0]
    b = _ridge([dict.fromkeys(p.keys, 1.0) for p in mem], [p.measured_bytes - p.predicted_bytes for p in mem],
               ridge) if mem else {}  # bytes: a plain offset per term
    return Corrections(tuple(sorted(t.items())), tuple(sorted(b.items())))


@dataclass(frozen=True)
class FitError:
    """Mean absolute relative error of predicted step times: as the cost model had them, after the fit on all
    points, and leave-one-out (each point predicted by a fit on the others)."""

    before: float
    after: float
    leave_one_out: float | None
    n: int


def errors(points: list[Measurement], ridge: float = 0.05) -> FitError:
    """How well the cost model predicts ``points`` before and after fitting them."""
    def mare(pred: list[float]) -> float:
        return float(np.mean([abs(q - p.measured_s) / p.measured_s for q, p in zip(pred, points, strict=True)]))

    corr = fit(points, ridge)
    loo = None
    if len(points) >= 3:
        loo = mare([fit(points[:i] + points[i + 1:], ridge).step_time(p) for i, p in enumerate(points)])
    return FitError(mare([p.predicted_s for p in points]), mare([corr.step_time(p) for p in points]), loo,
                    len(points))


def _catalog_profile(name: str) -> DeviceProfile:
    """A profile that reproduces the catalog figures exactly (what an uncalibrated device is modelled with)."""
    d = DeviceModel(device_type(name))
    return DeviceProfile((), d.intra_bw, d.latency, d.comm_overlap, d.act_scale, d.overhead_bytes)


def write_back(profiles: dict[str, DeviceProfile], corr: Corrections, devices: list[str]
               ) -> dict[str, DeviceProfile]:
    """``profiles`` with ``corr`` applied to every device type in ``devices``: step-time factors multiplied into
    ``step_scale``, bytes added to ``engine_memory`` (a device without a profile gets the catalog's figures plus the
    corrections, so nothing else about its predictions changes)."""
    out = dict(profiles)
    for name in devices:
        key = device_type(name).name
        pr = out.get(key) or _catalog_profile(key)
        t, m = dict(pr.step_scale), dict(pr.engine_memory)
        for k, v in corr.time:
            t[k] = t.get(k, 1.0) * math.exp(v)
        for k, v in corr.memory:
            m[k] = m.get(k, 0.0) + v
        out[key] = replace(pr, step_scale=tuple(sorted(t.items())), engine_memory=tuple(sorted(m.items())))
    return out
