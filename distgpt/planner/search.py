"""The search: enumerate layouts and options, score them with the cost model, keep what the engine can run.

Layouts, for every subset of node groups (so slow or far groups can be left out):
  * "replicas": every data-parallel replica lives on one node group (its own device type); replicas of different types
    get batch shares proportional to their speed.
  * "hetero-pipeline": every replica is a pipeline whose stages sit on different device types, with layers split in
    proportion to each stage's speed (and capped by its memory).
Options per layout: micro-batch size, data-parallel engine / ZeRO stage, activation recomputation. Tensor-parallel
groups stay inside one node and one device type. Every emitted Plan passes ``Plan.problems`` (it is runnable).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from distgpt.planner.cost import DeviceModel, Workload, layer_time
from distgpt.planner.evaluate import Candidate, Evaluator, Layout
from distgpt.planner.inventory import Inventory, NodeGroup

TP_DEGREES = (1, 2, 4, 8)
MICRO = (1, 2, 4, 8, 16, 32)
ENGINES = (("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))


@dataclass
class Objective:
    """What 'best' means, and the constraints every plan must meet."""

    goal: str = "throughput"  # or "cost"
    max_price_per_hour: float | None = None
    min_tokens_per_s: float | None = None

    def admits(self, c: Candidate) -> bool:
        if self.max_price_per_hour is not None and c.price_per_hour > self.max_price_per_hour:
            return False
        return self.min_tokens_per_s is None or c.tokens_per_s >= self.min_tokens_per_s

    def key(self, c: Candidate) -> float:
        return c.cost_per_mtok if self.goal == "cost" and c.cost_per_mtok > 0 else -c.tokens_per_s


@dataclass
class SearchResult:
    """Ranked candidates (best first) and, when there are none, why."""

    ranked: list[Candidate]
    evaluated: int
    reasons: dict[str, int] = field(default_factory=dict)


def subsets(groups: tuple[NodeGroup, ...], speed) -> list[tuple[NodeGroup, ...]]:
    """All non-empty subsets for up to 6 groups; beyond that, the fastest-first prefixes and each group alone."""
    if len(groups) <= 6:
        return [s for r in range(1, len(groups) + 1) for s in itertools.combinations(groups, r)]
    order = sorted(groups, key=speed, reverse=True)
    return [tuple(order[:k]) for k in range(1, len(order) + 1)] + [(g,) for g in order[1:]]


def _pp_options(n_layer: int, devices: int, tp: int) -> list[int]:
    out = [p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if p <= n_layer and p * tp <= devices]
    return out or [1]


def even_layers(n_layer: int, pp: int) -> tuple[int, ...]:
    return tuple(n_layer // pp + (1 if i < n_layer % pp else 0) for i in range(pp))


def speed_layers(n_layer: int, speeds: list[float]) -> tuple[int, ...]:
    """Layers per stage proportional to stage speed (largest remainder), at least one each."""
    raw = [n_layer * s / sum(speeds) for s in speeds]
    out = [max(1, int(r)) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: raw[k] - int(raw[k]), reverse=True):
        if sum(out) >= n_layer:
            break
        out[k] += 1
    while sum(out) > n_layer:
        k = max(range(len(out)), key=lambda k: out[k])
        out[k] -= 1
    return tuple(out)


def layouts(ev: Evaluator, groups: tuple[NodeGroup, ...]) -> list[Layout]:
    """Same-type replicas over ``groups``, plus mixed-type pipelines when there are several groups."""
    w, out = ev.w, []
    n_layer = w.model.n_layer
    for tp in TP_DEGREES:
        if any(tp > g.count for g in groups) or w.model.n_head % tp or w.model.vocab_size % tp:
            continue
        for pp in _pp_options(n_layer, min(g.devices for g in groups), tp):
            kinds = tuple(((g,) * pp, g.devices // (tp * pp)) for g in groups if g.devices >= tp * pp)
            if kinds:
                out.append(Layout(tp, pp, even_layers(n_layer, pp), kinds, "replicas"))
        if len(groups) > 1:
            out += _hetero(ev, groups, tp)
    return out


def _hetero(ev: Evaluator, groups: tuple[NodeGroup, ...], tp: int) -> list[Layout]:
    """Pipelines with stages on every group of the subset: 1, 2 or 4 stages per group."""
    out = []
    ordered = sorted(groups, key=lambda g: -g.device.memory_bytes)  # the first stage holds the most in flight
    for per_group in itertools.product((1, 2, 4), repeat=len(ordered)):
        stages = tuple(g for g, k in zip(ordered, per_group, strict=True) for _ in range(k))
        pp = len(stages)
        if pp > ev.w.model.n_layer:
            continue
        dp = min(g.devices // (tp * k) for g, k in zip(ordered, per_group, strict=True))
        if dp < 1:
            continue
        speeds = [1 / layer_time(ev.w, ev.dev(g), 1, tp, False) for g in stages]
        out.append(Layout(tp, pp, speed_layers(ev.w.model.n_layer, speeds), ((stages, dp),), "hetero-pipeline"))
    return out


def options(lay: Layout, n_kinds: int):
    """(engine, zero stage) choices the engine supports for this layout."""
    for engine, zero in ENGINES:
        if (lay.tp > 1 or lay.pp > 1) and engine == "deepspeed":
            continue
        if engine == "deepspeed" and n_kinds > 1:  # uneven shares are likely; DeepSpeed needs equal ones
            continue
        yield engine, zero


def search(w: Workload, inv: Inventory, objective: Objective | None = None,
           devices: dict[str, DeviceModel] | None = None, top: int = 10, every_option: bool = False) -> SearchResult:
    """Rank the runnable plans for ``w`` on ``inv``: the best micro-batch / recomputation choice of each structure
    and engine, or (``every_option``, what a tune measures) every runnable combination."""
    objective = objective or Objective()
    ev = Evaluator(w, inv, devices or {})
    best: dict[str, Candidate] = {}
    reasons: dict[str, int] = {}
    n = 0
    speed = lambda g: 1 / layer_time(w, ev.dev(g), 1, 1, False)  # noqa: E731
    for groups in subsets(inv.groups, speed):
        for lay in layouts(ev, groups):
            for (engine, zero), m, rc in itertools.product(options(lay, len(lay.kinds)), MICRO, (False, True)):
                n += 1
                c = ev.evaluate(lay, m, engine, zero, rc)
                if isinstance(c, str):
                    key = c.split(":")[0]
                    reasons[key] = reasons.get(key, 0) + 1
                    continue
                if not objective.admits(c) or c.plan.problems(w.model, None, w.global_batch):
                    continue
                # One row per structure and engine: keep its best micro-batch / recomputation choice.
                sig = (lay, engine, zero) if not every_option else (lay, engine, zero, m, rc)
                if sig not in best or _rank(objective, c) < _rank(objective, best[sig]):
                    best[sig] = c
    ranked = sorted(best.values(), key=lambda c: _rank(objective, c))[:top]
    return SearchResult(ranked, n, reasons)


def _rank(objective: Objective, c: Candidate) -> tuple[float, float]:
    """The objective, then (on ties) the larger memory margin."""
    return objective.key(c), max(c.memory[k] / c.capacity[k] for k in c.memory)
