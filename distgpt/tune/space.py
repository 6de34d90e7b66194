"""What a tune searches, as plain data (no Ray): the planner's runnable Plans for a job and cluster, each with the
cost model's prediction (``--space plans``), or hyper-parameters around the job's own with one Plan fixed
(``--space hparams``).

Memory-infeasible Plans never become arms: the search drops them before scoring (``evaluate`` returns why), so a
tune launches only Plans the cost model expects to fit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from distgpt.config import JobConfig
from distgpt.errors import DistgptError
from distgpt.planner.cost import DeviceModel
from distgpt.planner.explain import nothing_fits
from distgpt.planner.inventory import Inventory
from distgpt.planner.plan import Plan
from distgpt.planner.refit import Measurement, measurement, plan_keys
from distgpt.planner.search import Objective, search


class SpaceError(DistgptError, ValueError):
    """Nothing to tune: no Plan fits, or the hyper-parameter space is empty; the message says why."""


@dataclass(frozen=True)
class Arm:
    """One point of a tune's space: a Plan (and, for hparams, the values that differ from the job's)."""

    index: int
    """Position in the cost model's ranking (0: predicted best)."""
    plan: Plan
    predicted_s: float = 0.0
    """The cost model's step time (0 for hparams arms: they are scored on loss)."""
    predicted_bytes: float = 0.0
    """The cost model's peak memory per device (the largest over device types)."""
    price_per_hour: float = 0.0
    hparams: dict[str, float] = field(default_factory=dict)

    @property
    def structure(self) -> tuple:
        """How the model is cut: dp × tp × pp and the stage split."""
        p = self.plan
        return p.dp, p.tp, p.pp, p.stage_layers

    @property
    def family(self) -> tuple:
        """The structure and the mechanisms it pays for (``refit.plan_keys``: one replica's ddp and fsdp are the
        same family); arms of one family differ in micro-batch size or recomputation only."""
        return (*self.structure, plan_keys(self.plan))

    def measured(self, step_s: float, peak_bytes: float = 0.0) -> Measurement:
        """This arm's prediction beside what a trial measured (for the cost model's write-back)."""
        return measurement(self.plan, self.predicted_s, step_s, self.predicted_bytes, peak_bytes)


def plan_arms(job: JobConfig, inv: Inventory, goal: str = "throughput",
              devices: dict[str, DeviceModel] | None = None) -> list[Arm]:
    """Every runnable Plan for ``job`` on ``inv``, best predicted first (SpaceError if none fits)."""
    w = job.workload()
    res = search(w, inv, Objective(goal), devices or {}, top=100_000, every_option=True)
    if not res.ranked:
        raise SpaceError(nothing_fits(res, inv, w))
    return [Arm(i, c.plan, c.step_time, max(c.memory.values()), c.price_per_hour) for i, c in enumerate(res.ranked)]


def first_trials(arms: list[Arm], explore: int) -> list[Arm]:
    """The trials to start with, ``explore`` of them, each the predicted best of its kind: first one per structure
    (dp × tp × pp: how many ranks share the work is what an uncalibrated model misjudges most — on CPU, one rank
    may use the cores of idle slots), then one per family (the other mechanisms of each structure), best predicted
    first within each round. The predicted winner always goes first."""
    out: list[Arm] = []
    for kind in ("structure", "family"):
        seen = {getattr(a, kind) for a in out}
        for a in arms:
            if len(out) == explore:
                return out
            if getattr(a, kind) not in seen and a not in out:
                seen.add(getattr(a, kind))
                out.append(a)
    return out


HPARAM_SCALES = {"lr": (1 / 3, 1 / 1.7, 1.0, 1.7, 3.0), "warmup": (0.0, 0.05, 0.1, 0.2), "batch": (0.5, 1.0, 2.0)}


def hparam_arms(job: JobConfig, plan: Plan, trials: int, steps: int, seed: int = 0) -> list[Arm]:
    """``trials`` points around the job's hyper-parameters with ``plan`` fixed: the job's own first, then a seeded
    random draw of lr (×⅓ … ×3), warm-up (0–20% of a trial's ``steps``) and global batch (×½, ×1, ×2) — keeping
    only batch sizes ``plan`` can cut (micro-batch and data-parallel shares must divide them)."""
    t = job.train
    rng = random.Random(seed)
    grid = [(lr, wu, b) for lr in HPARAM_SCALES["lr"] for wu in HPARAM_SCALES["warmup"] for b in HPARAM_SCALES["batch"]]
    rng.shuffle(grid)
    out = [Arm(0, plan, hparams={"lr": t.lr, "warmup_steps": float(min(t.warmup_steps, steps)),
                                 "global_batch_size": float(t.global_batch_size)})]
    for lr, wu, b in grid:
        if len(out) >= trials:
            break
        batch = int(t.global_batch_size * b)
        if batch < 1 or _cuts(plan, batch):
            continue
        hp = {"lr": t.lr * lr, "warmup_steps": float(math.floor(wu * steps)), "global_batch_size": float(batch)}
        if hp not in [a.hparams for a in out]:
            out.append(Arm(len(out), plan, hparams=hp))
    if not out:
        raise SpaceError("no hyper-parameter point fits the plan — fix: choose a global_batch_size the plan's "
                         "micro_batch_size × dp divides")
    return out


def _cuts(plan: Plan, batch: int) -> str:
    """Why ``plan`` cannot cut a global batch of ``batch`` ('' if it can)."""
    if plan.batch_shares:
        return "" if sum(plan.batch_shares) == batch else "fixed batch shares"
    per = batch // plan.dp
    if batch % plan.dp or (plan.micro_batch_size and per % plan.micro_batch_size) or per < plan.pp:
        return "does not divide"
    return ""
