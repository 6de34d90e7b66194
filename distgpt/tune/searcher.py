"""The tune's searcher: the cost model proposes, measurements correct it, the corrected model proposes again.

A Ray Tune ``Searcher`` over the arms of ``space.py``. Plans: the first ``explore`` trials are the predicted best of
each family (structure and engine), best first — the predicted winner runs first, and the mechanisms the model may
misjudge get measured early. Every later trial is the untried arm the cost model, refitted on every measurement so
far (``planner/refit.py``), predicts best. Hyper-parameters: the arms in their order (the job's own first).
The state (which trial got which arm, what was measured) is saved with the experiment, so a resumed tune goes on
where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.search import Searcher

from distgpt.planner.refit import Measurement, fit
from distgpt.tune.space import Arm, first_trials


class ArmSearcher(Searcher):
    """Suggests ``{"arm": index, "n": trial number}`` until ``trials`` are started or the arms run out."""

    def __init__(self, arms: list[Arm], trials: int, explore: int, adaptive: bool, goal: str = "throughput",
                 order: list[int] | None = None):
        super().__init__(metric="score", mode="max")
        self.arms, self.trials, self.adaptive, self.goal = arms, trials, adaptive and not order, goal
        self.first = list(order) if order else [a.index for a in (first_trials(arms, explore) if adaptive
                                                                    else arms[:trials])]
        self.assigned: dict[str, int] = {}
        self.measured: dict[int, tuple[float, float]] = {}
        """arm index → (median step seconds, peak bytes) of a trial that reported steps."""

    def suggest(self, trial_id: str) -> dict | None:
        """The next arm, or FINISHED once ``trials`` have started or every arm has."""
        if len(self.assigned) >= self.trials:
            return Searcher.FINISHED
        arm = self._next()
        if arm is None:
            return Searcher.FINISHED
        self.assigned[trial_id] = arm.index
        return {"arm": arm.index, "n": len(self.assigned)}

    def _next(self) -> Arm | None:
        tried = set(self.assigned.values())
        for i in self.first:
            if i not in tried:
                return self.arms[i]
        left = [a for a in self.arms if a.index not in tried]
        if not left:
            return None
        if not self.adaptive:
            return left[0]
        corr = fit(self.points())
        price = (lambda a: a.price_per_hour or 1.0) if self.goal == "cost" else (lambda a: 1.0)  # noqa: E731
        return min(left, key=lambda a: corr.step_time(a.measured(0.0)) * price(a))

    def points(self) -> list[Measurement]:
        """Every arm measured so far, beside its prediction."""
        return [self.arms[i].measured(s, b) for i, (s, b) in self.measured.items()]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Keep the latest steady step time (an early-stopped trial's last one counts too)."""
        self._keep(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial ended: record what it measured (nothing if it failed before its first step)."""
        if result:
            self._keep(trial_id, result)

    def _keep(self, trial_id: str, result: dict) -> None:
        arm = self.assigned.get(trial_id)
        if arm is None or result.get("status") == "failed" or not result.get("step_s") or result.get("step", 0) < 2:
            return
        self.measured[arm] = (float(result["step_s"]), float(result.get("peak_gb", 0.0)) * 2**30)

    def save(self, checkpoint_path: str) -> None:
        """Persist the assignment and the measurements (Tune calls this with the experiment state)."""
        state = {"assigned": self.assigned, "measured": {str(k): v for k, v in self.measured.items()}}
        Path(checkpoint_path).write_text(json.dumps(state))  # JSON, not pickle: loading it runs no code

    def restore(self, checkpoint_path: str) -> None:
        """Take the state back from ``save``."""
        state = json.loads(Path(checkpoint_path).read_text())
        self.assigned = {str(k): int(v) for k, v in state["assigned"].items()}
        self.measured = {int(k): (float(v[0]), float(v[1])) for k, v in state["measured"].items()}
