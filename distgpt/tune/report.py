"""What a tune shows and keeps: progress lines while it runs, then a table of trials (predicted vs measured), the best
Plan, and the measurements written back into a planner profile (with the cost model's error before and after)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

from ray import tune

from distgpt import storage
from distgpt.planner.calibrate import load_profile, save_profile
from distgpt.planner.plan import Plan
from distgpt.planner.refit import FitError, Measurement, errors, fit, write_back
from distgpt.tune.space import Arm


@dataclass
class TrialRow:
    """One trial as the table shows it."""

    n: int
    arm: int
    plan: str
    hparams: dict[str, float]
    predicted_s: float
    measured_s: float
    predicted_gb: float
    peak_gb: float
    tokens_per_s: float
    score: float
    val_loss: float
    steps: int
    status: str
    """'finished', 'stopped' (early, by the scheduler), 'failed' or 'interrupted'."""
    why: str


@dataclass
class TuneReport:
    """The tune's outcome."""

    rows: list[TrialRow]
    best: TrialRow | None
    wall_s: float
    interrupted: bool
    devices: list[str] = field(default_factory=list)
    fit: FitError | None = None
    points: list[Measurement] = field(default_factory=list)
    """The measured trials beside their predictions: what the fit and the profile write-back use."""


def dump_arms(arms: list[Arm], devices: list[str]) -> bytes:
    """The space as JSON (a resumed tune reads it back instead of planning again)."""
    return json.dumps({"devices": devices, "arms": [{**asdict(a), "plan": json.loads(a.plan.to_json())}
                                                    for a in arms]}, indent=1).encode()


def load_arms(data: bytes) -> tuple[list[Arm], list[str]]:
    """``dump_arms`` read back."""
    d = json.loads(data)
    arms = [Arm(a["index"], Plan.from_json(json.dumps(a["plan"])), a["predicted_s"], a["predicted_bytes"],
                a["price_per_hour"], a["hparams"]) for a in d["arms"]]
    return arms, list(d["devices"])


@dataclass
class Ledger:
    """The trials this process's fit started and saw end (complete, stopped by the scheduler, or errored). One that
    started and never ended was cut short by an interrupt (Ctrl-C, a stopped Ray job): Tune's clean-up then marks it
    TERMINATED like a trial the scheduler stopped, and only this tells the two apart. Kept outside the callback:
    a resumed tune runs the callback Tune saved with the experiment, not one this process made."""

    started: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)

    def reset(self) -> None:
        """Forget an earlier fit's trials (a process may run more than one tune)."""
        self.started.clear()
        self.ended.clear()

    def cut_short(self) -> set[str]:
        """Trial ids started here whose end Tune never reported."""
        return self.started - self.ended


LEDGER = Ledger()
"""This process's; ``runner.tune_job`` clears it before each fit."""


class Progress(tune.Callback):
    """One line per trial start and end: which arm, what it measured, why it stopped (and the ``LEDGER``)."""

    def __init__(self, arms: list[Arm], total: int, log):
        self.arms, self.total, self.log = arms, total, log

    def _name(self, trial) -> str:
        arm = self.arms[trial.config["arm"]]
        what = arm.plan.describe() if not arm.hparams else _hp(arm.hparams)
        return f"trial {trial.config.get('n', '?')}/{self.total} ({what})"

    def on_trial_start(self, iteration, trials, trial, **info):
        LEDGER.started.add(trial.trial_id)
        arm = self.arms[trial.config["arm"]]
        pred = f", predicted {_ms(arm.predicted_s)} ms/step" if arm.predicted_s else ""
        self.log(f"[tune] {self._name(trial)} started{pred}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        LEDGER.ended.add(trial.trial_id)
        r = trial.last_result or {}
        if r.get("status") == "failed":
            self.log(f"[tune] {self._name(trial)} failed: {r.get('reason')}")
            return
        how = "finished" if r.get("status") == "finished" else f"stopped early at step {r.get('step', 0)} (ASHA)"
        self.log(f"[tune] {self._name(trial)} {how}: {r.get('step_s', 0) * 1e3:.0f} ms/step, "
                 f"{r.get('tokens_per_s', 0):,.0f} tokens/s, loss {r.get('loss', math.nan):.3f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        LEDGER.ended.add(trial.trial_id)
        self.log(f"[tune] {self._name(trial)} errored: {_error(trial)}")


def _ms(seconds: float) -> str:
    """Milliseconds to three significant figures (a GPU's predicted step may be a fraction of one)."""
    return f"{seconds * 1e3:.3g}"


def _hp(hp: dict[str, float]) -> str:
    return f"lr={hp['lr']:.2e} warmup={int(hp['warmup_steps'])} batch={int(hp['global_batch_size'])}"


def _error(trial) -> str:
    try:
        err = trial.get_error()
    except Exception:  # the error file may be missing on a restored experiment
        err = None
    return str(err).strip().splitlines()[-1][:200] if err else "the trial process failed"


def row_of(trial, arms: list[Arm], max_t: int, cut: frozenset[str] = frozenset()) -> TrialRow:
    """A Tune Trial → its row (status from the trial's state and its last report; ``cut``: the ids of trials an
    interrupt stopped, see ``Ledger``)."""
    arm = arms[trial.config["arm"]]
    r = trial.last_result or {}
    reported = r.get("status")
    if trial.status == "ERROR":
        status, why = "failed", _error(trial)
    elif reported == "failed":
        status, why = "failed", str(r.get("reason", ""))
    elif reported == "finished":
        status, why = "finished", f"ran all {r.get('step', 0)} steps"
    elif trial.status == "TERMINATED" and r.get("training_iteration", 0) < max_t and trial.trial_id not in cut:
        status, why = "stopped", f"stopped by ASHA after step {r.get('step', 0)}: below its rung's cutoff"
    else:
        status, why = "interrupted", "the tune was interrupted before this trial ended"
    return TrialRow(int(trial.config.get("n", 0)), arm.index, arm.plan.describe(), dict(arm.hparams), arm.predicted_s,
                    float(r.get("step_s", 0.0)), arm.predicted_bytes / 2**30, float(r.get("peak_gb", 0.0)),
                    float(r.get("tokens_per_s", 0.0)), float(r.get("score", math.nan)),
                    float(r.get("val_loss", math.nan)), int(r.get("step", 0)), status, why)


def build(arms: list[Arm], devices: list[str], trials: list, wall_s: float, planned: int,
          max_t: int, injected: set[int] | None = None, cut: frozenset[str] = frozenset()) -> TuneReport:
    """The report of a finished (or interrupted) tune. Trials ``injected`` with a fault (a drill's straggler) rank
    by what they measured but are no evidence about their plan's costs: the refit leaves them out. ``cut``: the
    trials an interrupt stopped (``Ledger.cut_short``)."""
    rows = sorted((row_of(t, arms, max_t, cut) for t in trials), key=lambda r: r.n)
    interrupted = len(rows) < planned or any(r.status == "interrupted" for r in rows)
    usable = [r for r in rows if r.status in ("finished", "stopped") and r.steps >= 2]
    best = max(usable, key=lambda r: r.score, default=None)
    points = [arms[r.arm].measured(r.measured_s, r.peak_gb * 2**30) for r in usable
              if arms[r.arm].predicted_s and r.n not in (injected or set())]
    return TuneReport(rows, best, wall_s, interrupted, devices, errors(points) if points else None, points)


def table(rep: TuneReport) -> str:
    """The trials, in the order they ran."""
    hp = any(r.hparams for r in rep.rows)
    head = (f"{'#':>2} {'hyper-parameters' if hp else 'plan':44} {'pred ms':>8} {'meas ms':>8} {'pred GB':>8} "
            f"{'peak GB':>8} {'tokens/s':>9} {'val loss' if hp else 'score':>9}  status / why")
    lines = [head]
    for r in rep.rows:
        what = _hp(r.hparams) if r.hparams else r.plan
        score = f"{r.val_loss:9.4f}" if hp else f"{r.score:9.0f}" if r.status != "failed" else f"{'-':>9}"
        mark = "*" if rep.best is r else " "
        lines.append(f"{r.n:>2}{mark}{what[:44]:44} {_ms(r.predicted_s):>8} {_ms(r.measured_s):>8} "
                     f"{r.predicted_gb:8.2f} {r.peak_gb:8.2f} {r.tokens_per_s:9,.0f} {score}  {r.status}: {r.why}")
    return "\n".join(lines)


def write(rep: TuneReport, out: str, arms: list[Arm], profile: str, log) -> None:
    """Print the table and the fit; write trials.json, best_plan.json and profile.json under ``out``."""
    log("\n" + table(rep))
    storage.write_bytes(storage.join(out, "trials.json"), json.dumps(
        {"wall_s": rep.wall_s, "interrupted": rep.interrupted, "trials": [asdict(r) for r in rep.rows]},
        indent=1).encode())
    if rep.best is None:
        return
    best = arms[rep.best.arm]
    storage.write_bytes(storage.join(out, "best_plan.json"), best.plan.to_json().encode())
    what = _hp(best.hparams) if best.hparams else best.plan.describe()
    log(f"\nbest: trial {rep.best.n} — {what} — {rep.best.tokens_per_s:,.0f} tokens/s"
        f"{f', val loss {rep.best.val_loss:.4f}' if best.hparams else ''}")
    log(f"  plan saved: {storage.redact(storage.join(out, 'best_plan.json'))} (`distgpt train JOB --plan FILE`)")
    if best.hparams:
        storage.write_bytes(storage.join(out, "best_hparams.json"), json.dumps(best.hparams, indent=1).encode())
        log(f"  hyper-parameters: --train.lr={best.hparams['lr']:.3g} "
            f"--train.warmup_steps={int(best.hparams['warmup_steps'])} "
            f"--train.global_batch_size={int(best.hparams['global_batch_size'])}")
    if rep.fit is not None:
        _write_profile(rep, out, profile, log)


def _write_profile(rep: TuneReport, out: str, profile: str, log) -> None:
    profiles = write_back(load_profile(profile) if profile else {}, fit(rep.points), rep.devices)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "profile.json")
        save_profile(local, profiles, {"tune": {"trials": len(rep.points), "steps": max(r.steps for r in rep.rows),
                                                "from_profile": profile or None}})
        storage.write_bytes(storage.join(out, "profile.json"), open(local, "rb").read())
    f = rep.fit
    loo = f"{f.leave_one_out:.0%}" if f.leave_one_out is not None else "n/a (under 3 trials)"
    log(f"  profile saved: {storage.redact(storage.join(out, 'profile.json'))} (`distgpt plan JOB --profile "
        f"FILE`); cost-model step-time error over {f.n} measured trials: {f.before:.0%} before → {f.after:.0%} "
        f"after (leave-one-out {loo})")
