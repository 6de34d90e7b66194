"""``distgpt tune``: Ray Tune over the planner's Plans (or hyper-parameters), trials as real distgpt runs.

    arms (space.py) → ArmSearcher (searcher.py) → trials (trial.py, each on its own placement group)
       → ASHA stops the slow ones → table, best Plan, refitted profile (planner/refit.py) → OUT

OUT (a directory or an object-store URI) holds Tune's experiment (``tune/``: resumable with ``--resume``), the arms
(``arms.json``, so a resumed tune searches exactly the same space), ``trials.json``, ``best_plan.json`` (what
``distgpt train --plan`` and ``cluster.plan`` take) and ``profile.json`` (``distgpt plan --profile``).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from distgpt import storage
from distgpt.config import JobConfig
from distgpt.errors import DistgptError, RunFailed
from distgpt.orchestrator.credentials import split_credentials
from distgpt.orchestrator.driver import absolute, connect
from distgpt.orchestrator.inventory import RayNode, ray_nodes, to_inventory
from distgpt.orchestrator.supervised import JobWatch
from distgpt.planner.calibrate import device_models, load_profile
from distgpt.planner.plan import Plan
from distgpt.tune import report
from distgpt.tune.searcher import ArmSearcher
from distgpt.tune.space import Arm, hparam_arms, plan_arms
from distgpt.tune.trial import TrialSettings, run_trial, trial_resources


class TuneError(DistgptError, ValueError):
    """A tune that cannot start: the message names the problem and the fix."""


class TuneFailed(RunFailed, RuntimeError):
    """Every trial failed: nothing was measured."""


@dataclass
class TuneOptions:
    """What ``distgpt tune`` was asked (the CLI's flags)."""

    out: str
    trials: int = 8
    steps: int = 20
    goal: str = "throughput"
    space: str = "plans"
    inventory: str = ""
    profile: str = ""
    plan: Plan | None = None
    """--space hparams: the Plan to hold fixed (default: the job's, or the planner's best with cluster.plan = auto)."""
    resume: bool = False
    address: str = ""
    explore: int = 0
    """Trials spent on the predicted best of each family before the refitted model proposes (0: half)."""
    grace_steps: int = 0
    """ASHA's first rung (0: a quarter of the steps, at least 3)."""
    reduction_factor: int = 2
    concurrency: int = 1
    hang_timeout_s: float = 60.0
    faults: dict[int, tuple[str, ...]] = field(default_factory=dict)
    only: tuple[int, ...] = ()
    """Measure just these arms (indexes in the space), in this order, to the last step (benchmark re-measurement)."""
    exhaustive: bool = False
    """Measure every arm in the cost model's order, to the last step (the reference ``distgpt bench tune`` compares
    a tune with): no early stopping, no model-guided choice, ``trials`` ignored."""


def say(line: str) -> None:
    """The tune's default log: a line to stdout. A function of this module, not the builtin ``print``, because the
    log rides in Tune's pickled callbacks, and Ray replaces ``builtins.print`` in a driver that receives a worker's
    ``tqdm_ray`` bar — the builtin then no longer pickles ("not the same object as builtins.print")."""
    print(line, flush=True)


def tune_job(job: JobConfig, o: TuneOptions, log: Callable[[str], None] = say) -> report.TuneReport:
    """Run the tune to its end (or to Ctrl-C, or to ``ray job stop`` of the job it runs in); write OUT; return the
    report."""
    watch = JobWatch.here()  # taken first: the sooner, the less can have ended unseen
    _check(job, o)
    if watch is not None and watch.gone():
        raise TuneStopped(watch.reason(RESUME))
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the loggers are chosen in _loggers (also on resume)
    log(f"ray: {connect(o.address or job.cluster.address, job.cluster.embedded_cpus)}")
    job = absolute(job)
    from distgpt.data.prepare import ensure_prepared

    ensure_prepared(job, progress=log)  # once, here: trials must not race to prepare the same data
    nodes = ray_nodes(job.cluster.cpus_per_worker)
    arms, devices = _arms(job, o, log)
    _check_placeable(arms, nodes)
    settings = TrialSettings(o.steps, o.space, o.goal, o.hang_timeout_s, job.cluster.start_timeout_s, o.faults)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job, arms=arms, settings=settings),
        resources=lambda config: trial_resources(arms[config["arm"]], nodes, job.cluster.cpus_per_worker))
    fs, root = storage.resolve(o.out)
    path = f"{root.rstrip('/')}/tune"
    t0 = time.monotonic()
    n = len(o.only) if o.only else len(arms) if o.exhaustive else min(o.trials, len(arms))
    progress = report.Progress(arms, n, log)
    if o.resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise TuneError(f"--resume: no tune to resume at {storage.redact(o.out)} — fix: drop --resume to start "
                            f"one, or give the --out of the interrupted tune")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, storage_filesystem=fs)
        log(f"resuming the tune at {storage.redact(o.out)}")
    else:
        tuner = tune.Tuner(trainable, tune_config=_tune_config(o, arms, job, n),
                           run_config=tune.RunConfig(name="tune", storage_path=root, storage_filesystem=fs,
                                                     verbose=0, callbacks=[progress, *_loggers(),
                                                                           StopWithTheJob(log)],
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    report.LEDGER.reset()
    grid = tuner.fit()
    trials = grid._experiment_analysis.trials  # Tune's Trial objects: their status tells finished from failed
    rep = report.build(arms, devices, trials, time.monotonic() - t0, n, o.steps + 1, injected=set(o.faults or {}),
                       cut=frozenset(report.LEDGER.cut_short()))
    report.write(rep, o.out, arms, o.profile, log)
    if rep.interrupted:
        log(f"\ninterrupted: {len(rep.rows)} of {n} trials started; resume with the same command and --resume")
    elif rep.best is None:
        raise TuneFailed("every trial failed (see the table above for why) — nothing was measured")
    return rep


RESUME = "resume it by submitting the same command again with --resume (finished trials are kept)"


class TuneStopped(RunFailed, RuntimeError):
    """The Ray job this tune runs in was stopped before the tune began."""


class StopWithTheJob(tune.Callback):
    """A tune run as a Ray job ends with the job. ``ray job stop`` signals the entrypoint's processes as they are at
    that instant and can miss the driver (``orchestrator/supervised.py``); a driver that did not get the signal sees
    its job's entrypoint gone here, at the next step of Tune's loop, and interrupts itself as Ctrl-C would: the
    trials are stopped (their ranks with them), the experiment is saved, and ``--resume`` carries it on.

    The watch is taken when the experiment starts, in the process that runs it: a resumed tune restores its
    callbacks from the saved experiment, and must not watch the stopped job's long-gone entrypoint."""

    def __init__(self, log):
        self.log, self.watch, self.sent = log, None, False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "watch": None, "sent": False}

    def setup(self, **info):
        self.watch = JobWatch.here()

    def on_step_begin(self, iteration, trials, **info):
        if self.watch is not None and not self.sent and self.watch.gone():
            self.sent = True
            self.log(f"\n{self.watch.reason(RESUME)}")
            os.kill(os.getpid(), signal.SIGINT)  # Tune's own handler: the interrupted-and-resumable path


def _loggers() -> list:
    """Each trial's results as JSON and CSV; not TensorBoard (its writer warns on a failed trial's NaN score, and
    ``distgpt train`` runs are what TensorBoard is for)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [JsonLoggerCallback(), CSVLoggerCallback()]


def _check(job: JobConfig, o: TuneOptions) -> None:
    if o.space not in ("plans", "hparams") or o.goal not in ("throughput", "cost"):
        raise TuneError("--space is 'plans' or 'hparams', --objective 'throughput' or 'cost'")
    if o.trials < 1 or o.steps < 4:
        raise TuneError(f"--trials {o.trials} --steps {o.steps}: need at least 1 trial of at least 4 steps (the "
                        f"first step is warm-up and is not timed)")
    if split_credentials(job)[1]:
        raise TuneError("the job names credentials inside a URI — fix: give them to the Ray cluster as environment "
                        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and drop them from the job file")


def _check_placeable(arms: list[Arm], nodes: list[RayNode]) -> None:
    """Refuse a space the connected cluster cannot host (Tune would wait for its resources forever): plans for an
    ``--inventory`` with devices or more slots than the cluster has."""
    have = {n.device for n in nodes}
    slots = sum(n.slots for n in nodes)
    named = {d for a in arms for d in (*a.plan.stage_devices, *a.plan.replica_devices)}
    missing = sorted(named - have)
    biggest = max(a.plan.world_size for a in arms)
    if missing or biggest > slots:
        why = f"devices {', '.join(missing)} that it lacks" if missing else f"{biggest} slots, it has {slots}"
        raise TuneError(f"the plans need {why} (the cluster: {to_inventory(nodes).summary() if nodes else 'empty'})"
                        f" — fix: tune on the cluster the plans are for (drop --inventory to plan for this one)")


def _arms(job: JobConfig, o: TuneOptions, log) -> tuple[list[Arm], list[str]]:
    """The space and its device types: saved with a tune (a resumed one uses exactly those), else made now."""
    saved = storage.join(o.out, "arms.json")
    if o.resume and storage.exists(saved):
        return report.load_arms(storage.read_bytes(saved))
    devices = device_models(load_profile(o.profile)) if o.profile else {}
    if o.inventory:
        from distgpt.planner.inventory import load_inventory

        inv = load_inventory(o.inventory)
    else:
        inv = to_inventory(ray_nodes(job.cluster.cpus_per_worker))
    if o.space == "plans":
        arms = plan_arms(job, inv, o.goal, devices)
        log(f"space: {len(arms)} runnable plans for {inv.summary()} (memory-infeasible ones excluded); "
            f"the cost model's best: {arms[0].plan.describe()} at {arms[0].predicted_s * 1e3:.3g} ms/step")
    else:
        plan = o.plan or (plan_arms(job, inv, "throughput", devices)[0].plan if job.cluster.plan == "auto"
                          else job.plan)
        arms = hparam_arms(job, plan, o.trials, o.steps, job.run.seed)
        log(f"space: {len(arms)} hyper-parameter points (lr, warm-up, batch) with the plan {plan.describe()}")
    devices = sorted(inv.by_type())
    storage.write_bytes(saved, report.dump_arms(arms, devices))
    return arms, devices


def _tune_config(o: TuneOptions, arms: list[Arm], job: JobConfig, n: int) -> tune.TuneConfig:
    grace = o.grace_steps or max(3, o.steps // 4)
    explore = o.explore or max(1, math.ceil(n / 2))
    searcher = ArmSearcher(arms, n, explore, adaptive=o.space == "plans" and not o.exhaustive, goal=o.goal,
                           order=list(o.only) or None)
    if o.exhaustive or o.only:
        return tune.TuneConfig(metric="score", mode="max", search_alg=searcher, num_samples=n,
                               max_concurrent_trials=o.concurrency)
    # max_t one past the steps: a finished trial's last report (its summary) comes after its last step
    asha = ASHAScheduler(time_attr="training_iteration", max_t=o.steps + 1, grace_period=min(grace, o.steps),
                         reduction_factor=o.reduction_factor)
    return tune.TuneConfig(metric="score", mode="max", search_alg=searcher, scheduler=asha, num_samples=n,
                           max_concurrent_trials=o.concurrency)
