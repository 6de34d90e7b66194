"""One tune trial: a short distgpt run of one arm on the placement group Tune reserved for it, each step reported.

The trial drives the same ``Controller`` and ``TrainWorker`` actors as ``distgpt train`` — stepped here, in the
trial's own actor, so the worker actors are the trial's children and share its fate — with the ranks placed in the
bundles of the trial's resource request (``trial_resources``: one empty bundle for the trial itself, then one per
rank, with the label selectors of the Plan's device types). Training failures are not retried (a tune measures, it
does not recover): an OOM, a hang (``hang_timeout_s`` without a step) or a failed start ends the trial with a
worst-score result that names the reason, and the tune goes on.

Reported every step: ``score`` (what the scheduler and the searcher maximise), ``step_s`` (median step time without
the first step, which pays for warm-up), ``tokens_per_s``, ``peak_gb`` (rank 0's peak memory so far), ``loss``, and
``status`` ('running', then 'finished' or 'failed' with a ``reason``).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import ray
from ray import tune

from distgpt.config import JobConfig
from distgpt.orchestrator.actor import ControllerActor
from distgpt.orchestrator.controller import State
from distgpt.orchestrator.inventory import RayNode
from distgpt.orchestrator.placement import Reserved, group_specs, node_kinds, trial_bundles
from distgpt.orchestrator.status import RecordEvent
from distgpt.tune.space import Arm

WORST = math.nan
"""The score of a failed trial: not a number, so ASHA's rungs (``np.nanpercentile``) ignore it — a failure must not
lower the bar the other trials are held to — and no measured score can be below it in the ranking."""


@dataclass(frozen=True)
class TrialSettings:
    """How every trial of one tune runs."""

    steps: int
    space: str = "plans"
    goal: str = "throughput"
    hang_timeout_s: float = 60.0
    start_timeout_s: float = 120.0
    faults: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Fault drills by trial number (1 = the first trial started): ``cluster.inject`` specs for that trial."""


def trial_job(job: JobConfig, arm: Arm, s: TrialSettings, out_dir: str, faults: tuple[str, ...] = ()) -> JobConfig:
    """The job one trial runs: ``s.steps`` steps of ``arm`` (its Plan, its hyper-parameters), every step logged,
    no checkpoints, no retries, its files in ``out_dir``."""
    hp = arm.hparams
    lr = hp.get("lr", job.train.lr)
    train = dataclasses.replace(
        job.train, max_steps=s.steps, log_interval=1, eval_interval=0, progress=False, tensorboard=False,
        save_final=False, lr=lr,
        min_lr=job.train.min_lr * lr / job.train.lr if job.train.lr else job.train.min_lr,
        warmup_steps=int(hp.get("warmup_steps", min(job.train.warmup_steps, s.steps))),
        global_batch_size=int(hp.get("global_batch_size", job.train.global_batch_size)))
    return dataclasses.replace(
        job, train=train, plan=arm.plan,
        run=dataclasses.replace(job.run, out_dir=out_dir, name=f"{job.run.name}-trial"),
        checkpoint=dataclasses.replace(job.checkpoint, uri=f"{out_dir}/checkpoints", interval=0, resume="never"),
        cluster=dataclasses.replace(job.cluster, max_failures=0, hang_timeout_s=s.hang_timeout_s,
                                    start_timeout_s=s.start_timeout_s, inject=list(faults), grow="ignore",
                                    plan="job", node_types="none"))


def trial_resources(arm: Arm, nodes: list[RayNode], cpus_per_worker: float) -> tune.PlacementGroupFactory:
    """The trial's resource request: nothing for the trial itself (Tune then leaves the empty head bundle out of
    the placement group), one bundle per rank in the Plan's rank order, as ``Reserved`` assigns them, each with
    its device type's label selector."""
    bundles, selectors = trial_bundles(group_specs(arm.plan, nodes, cpus_per_worker, kinds=node_kinds(nodes)))
    return tune.PlacementGroupFactory([{}, *bundles], strategy="PACK",
                                      bundle_label_selector=selectors if any(selectors) else None)


class Scorer:
    """Step records → the metrics a trial reports."""

    def __init__(self, job: JobConfig, arm: Arm, s: TrialSettings):
        self.tokens_per_step = job.train.global_batch_size * job.seq_len
        self.per_price = 3600.0 / arm.price_per_hour if s.goal == "cost" and arm.price_per_hour else 1.0
        self.space = s.space
        self.times: list[float] = []
        self.peak_gb = 0.0
        self.loss = math.nan
        self.val_loss = math.nan

    def add(self, rec: dict) -> dict:
        """One training step's record → this step's report."""
        self.times.append(float(rec.get("step_time_s", 0.0)))
        self.peak_gb = max(self.peak_gb, float(rec.get("mem_gb") or 0.0))
        self.loss = float(rec["loss"])
        return self.metrics("running")

    def metrics(self, status: str, reason: str = "") -> dict:
        """The report: for plans the score is tokens/s (per unit of price with goal 'cost'); for hparams, minus
        the loss (validation loss once measured, training loss before)."""
        steady = self.times[1:] or self.times
        step_s = statistics.median(steady) if steady else 0.0
        tps = self.tokens_per_step / step_s if step_s else 0.0
        if status == "failed":
            score = WORST
        elif self.space == "hparams":
            score = -(self.val_loss if not math.isnan(self.val_loss) else self.loss)
        else:
            score = tps * self.per_price
        out = {"score": score, "step": len(self.times), "step_s": step_s, "tokens_per_s": tps,
               "peak_gb": self.peak_gb, "status": status, "reason": reason}
        out.update({k: v for k, v in (("loss", self.loss), ("val_loss", self.val_loss)) if not math.isnan(v)})
        return out


def failure_reason(error: str) -> str:
    """The controller's error as one short line: what went wrong, first."""
    first = error.strip().splitlines()[0] if error.strip() else "failed"
    for marker, what in (("OutOfMemoryError", "out of memory"), ("watchdog", "hang"),
                         ("start_failed", "failed to start"), ("could not host", "failed to start")):
        if marker in error:
            return f"{what}: {first[:160]}"
    return first[:200]


def run_trial(config: dict, job: JobConfig, arms: list[Arm], settings: TrialSettings) -> None:
    """The Tune trainable: run arm ``config['arm']`` (trial number ``config['n']``), reporting every step."""
    arm = arms[config["arm"]]
    out = tempfile.mkdtemp(prefix="distgpt-trial-")
    tjob = trial_job(job, arm, settings, out, settings.faults.get(config.get("n", 0), ()))
    pg = ray.util.get_current_placement_group()
    ctl = ControllerActor(tjob, arm.plan, f"distgpt-tune-{tune.get_context().get_trial_id()}",
                          reserved=Reserved(pg) if pg is not None else None)
    scorer, seen = Scorer(tjob, arm, settings), 0
    try:
        while True:
            state = ctl.ctrl.step()
            events = ctl.ctrl.events
            for e in events[seen:]:
                if isinstance(e, RecordEvent) and e.record.get("kind") is None and "loss" in e.record:
                    tune.report(scorer.add(e.record))  # Tune may stop the trial here (early stopping)
                elif isinstance(e, RecordEvent) and e.record.get("kind") == "val" and "source" not in e.record:
                    scorer.val_loss = float(e.record["loss"])
            seen = len(events)
            if state in (State.FINISHED, State.FAILED):
                break
            time.sleep(0.2)
        if state == State.FAILED:
            tune.report(scorer.metrics("failed", failure_reason(ctl.ctrl.error)))
        else:
            tune.report(scorer.metrics("finished"))
    finally:  # also when Tune stops the trial (early stopping, Ctrl-C): the ranks go with it, at once
        if ctl.ctrl.group is not None:
            ctl.ctrl.group.shutdown()
        shutil.rmtree(out, ignore_errors=True)
