"""``distgpt train`` on Ray: connect (or start a loopback cluster), plan, start the controller, stream its events.

The driver shows progress and writes ``metrics.jsonl`` / TensorBoard from the records rank 0 streams. Restarting the
driver with the same job resumes from the latest committed checkpoint (the trainer's ``checkpoint.resume = "auto"``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable

# torch before Ray, always: in a Ray job with a working_dir, a driver that calls ray.init() before torch is first
# imported dies at its first matmul ("Intel oneMKL FATAL ERROR: Cannot load …/libtorch_cpu.so"; reproduced with
# `ray job submit --working-dir` and two lines of Python). The driver loads torch later, to write the final sample.
import torch  # noqa: F401, I001  # isort: skip
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distgpt.config import JobConfig
from distgpt.errors import RunFailed
from distgpt.orchestrator.actor import ControllerActor
from distgpt.orchestrator.autoscale import NodeTypes, node_types
from distgpt.orchestrator.credentials import split_credentials
from distgpt.orchestrator.inventory import RayNode, ray_nodes, to_inventory
from distgpt.orchestrator.loopback import keep_local
from distgpt.orchestrator.planning import best_on, plan_for
from distgpt.orchestrator.status import (
    Event,
    GrowthEvent,
    LogEvent,
    PlacementEvent,
    RecordEvent,
    RecoveryEvent,
    ResumedEvent,
    RunSummary,
    StateEvent,
)
from distgpt.orchestrator.supervised import JobWatch
from distgpt.planner.plan import Plan
from distgpt.train.metrics import MetricsSink, progress_bar


class OrchestrationError(RunFailed, RuntimeError):
    """The run failed on the cluster; the message gives the cause and what was tried."""


class JobStopped(OrchestrationError):
    """The Ray job this driver ran in was stopped; the run was stopped with it."""


def connect(address: str, embedded_cpus: int = 0) -> str:
    """Join ``address`` (or $RAY_ADDRESS); without one, start a local cluster bound to 127.0.0.1. Returns a label."""
    if ray.is_initialized():
        return _already_connected(address)
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return f"Ray cluster at {address}"
    _loopback_only()
    cpus = embedded_cpus or os.cpu_count() or 1
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=cpus)
    _stop_the_autoscaler_monitor()
    return f"embedded local Ray cluster ({cpus} CPUs, 127.0.0.1)"


def _stop_the_autoscaler_monitor() -> None:
    """An embedded cluster is one node of fixed size: its autoscaler monitor has nothing to scale, yet it wakes
    every second on the cores the ranks train on, and at shutdown it ignores SIGTERM until Ray's 1 s grace runs out
    (measured: 1.0 s of a 1.4 s ``ray.shutdown``). ``ray start`` has ``--no-monitor``; ``ray.init`` has no such
    switch, so the process ``ray.init`` started is killed here through ``ray._private`` — if that layout changes,
    only this saving is lost."""
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        info.process.kill()
        info.process.wait()


def release() -> None:
    """Stop the embedded cluster this process started, now (a joined cluster is left alone: the caller may still
    be using it). Left to Ray's exit hook, the shutdown first sleeps 0.5 s for log lines the driver already
    streamed."""
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if ray.is_initialized() and getattr(node, "all_processes", None):  # a joined cluster's node starts none
        ray.shutdown()


def _loopback_only() -> None:
    """Keep an embedded cluster on 127.0.0.1. Without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray resolves this
    machine's external address (despite ``_node_ip_address``): its workers advertise it to gloo, the agents listen on
    it and every process connects to the GCS through it. Ray reads the variable once, when it is imported — this
    module imports Ray first, so setting it now alone is too late for this process (measured: a task then reports the
    external address) — so the constant read from it is set too; the processes Ray starts inherit the variable."""
    keep_local()  # and no usage report to Ray's collector (orchestrator/loopback.py)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")


def _already_connected(address: str) -> str:
    """This process already joined a cluster (a notebook, a test session): an explicit other ``address`` is refused
    rather than silently ignored, so a job never trains on a cluster its user did not name."""
    current = ray.get_runtime_context().gcs_address
    if address and "://" not in address and address not in ("auto", current):
        _check_reachable(address)
        raise OrchestrationError(
            f"this process is already connected to the Ray cluster at {current}, not {address} — fix: drop "
            f"--address to use the connected cluster, or call ray.shutdown() first")
    return f"Ray cluster at {current} (already connected)"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once on a GCS address nobody listens on: ``ray.init`` would retry it for minutes, logging warnings."""
    if "://" in address or address == "auto" or ":" not in address:
        return  # ray:// clients, 'auto' and bare names are Ray's to resolve
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise OrchestrationError(
            f"cannot reach a Ray cluster at {address} ({e}) — fix: start one there (`ray start --head "
            f"--node-ip-address=…`), correct --address / $RAY_ADDRESS, or leave both unset to run on an embedded "
            f"local cluster") from None


def absolute(job: JobConfig) -> JobConfig:
    """Local paths made absolute (workers do not share the driver's working directory); no progress bar on the
    workers (the driver draws it)."""
    def fix(p: str) -> str:
        return p if not p or "://" in p else os.path.abspath(p)

    run = dataclasses.replace(job.run, out_dir=fix(job.out_dir))
    data = dataclasses.replace(job.data, prepared=fix(job.prepared_dir),
                               mix={fix(uri): share for uri, share in job.data.mix.items()})
    ckpt = dataclasses.replace(job.checkpoint, uri=fix(job.checkpoint_uri))
    init = dataclasses.replace(job.init, from_=fix(job.init.from_))
    train = dataclasses.replace(job.train, progress=False)  # the driver draws the bar
    return dataclasses.replace(job, run=run, data=data, checkpoint=ckpt, train=train, init=init)


def choose_plan(job: JobConfig, plan: Plan | None, types: NodeTypes, log=print) -> tuple[Plan, list[RayNode]]:
    """The Plan to start with: --plan, the planner's ('auto'), or the job's [plan]. With the autoscaler's node types
    the planner plans for the cluster they can grow to, and a Plan they cannot host is refused here, at once.
    Also returns the nodes it saw: nodes that join after them are growth."""
    nodes = ray_nodes(job.cluster.cpus_per_worker)
    up = f"{to_inventory(nodes).summary()} on {len(nodes)} nodes" if nodes else "no worker node up yet"
    if types.path:
        log(f"cluster: {up}; the autoscaler can grow it to {types.inventory().summary()} (node types: {types.path})")
    else:
        log(f"cluster: {to_inventory(nodes).summary()} on {len(nodes)} nodes")
    if plan is None and job.cluster.plan == "auto":
        plan = best_on(job, types.inventory()).plan if types.path else plan_for(job, nodes)
        log(f"planner chose: {plan.describe()}")
    plan = plan or job.plan
    if types.path:
        log(f"autoscaler: the plan needs {types.demand(job, plan)}")
    return plan, nodes


def run_on_ray(job: JobConfig, plan: Plan | None = None, address: str = "", log=print,
               while_starting: Callable[[], None] | None = None) -> RunSummary:
    """Run ``job`` on Ray to the end; return the controller's summary. Raises OrchestrationError on failure.
    ``while_starting``: work of the driver's own (imports it needs later) done while the workers start, not
    before Ray does."""
    watch = JobWatch.here()  # taken first: the sooner, the less can have ended unseen
    log(f"ray: {connect(address or job.cluster.address, job.cluster.embedded_cpus)}")
    if watch is not None and watch.gone():
        raise JobStopped(watch.reason())
    bar = job.train.progress  # the driver's bar; the workers never draw one (``absolute``)
    job, secrets = split_credentials(absolute(job))  # credentials reach the workers as environment only
    types = node_types(job.cluster.node_types)
    plan, nodes = choose_plan(job, plan, types, log)
    if not job.checkpoint.interval:
        log("note: checkpoint.interval is 0 — a failure restarts training from step 0")
    name = f"distgpt-{job.run.name}-{os.getpid()}-{int(time.time())}"
    here = ray.get_runtime_context().get_node_id()  # the controller lives and dies with the driver's node
    actor = ray.remote(ControllerActor).options(
        num_cpus=0, max_concurrency=4, name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        runtime_env={"env_vars": secrets} if secrets else None,  # the worker actors inherit it
    ).remote(job, plan, name, types, nodes)
    done = actor.run.remote()
    try:
        if while_starting is not None:
            while_starting()
        summary = _stream(actor, done, job, bar, watch)
    finally:
        ray.kill(actor)  # workers and placement groups are gone already; the controller goes too
    if summary.state != "finished":
        raise OrchestrationError(f"run {job.run.name} failed: {summary.error}")
    return summary


def _stream(actor, done, job: JobConfig, show_bar: bool, watch: JobWatch | None = None) -> RunSummary:
    """Follow the controller's events until ``done``: records → metrics files and the bar, the rest → log lines.
    Raises JobStopped when ``watch`` says the Ray job this driver runs in was stopped."""
    sink = MetricsSink(job.out_dir, job.train.tensorboard)
    bar = progress_bar(job.train.max_steps, 0, show_bar)  # disabled, its write() still prints the log lines
    seen, finished = 0, False
    try:
        while not finished:
            finished = bool(ray.wait([done], timeout=0.5)[0])
            events = ray.get(actor.events.remote(seen))
            seen += len(events)
            for e in events:
                _show(e, sink, bar)
            if watch is not None and not finished and watch.gone():
                raise JobStopped(watch.reason())  # the caller kills the controller, and with it the workers
        return ray.get(done)
    finally:
        bar.close()
        sink.close()


def _show(e: Event, sink: MetricsSink, bar) -> None:
    """One controller event on the terminal and, for records and recoveries, in metrics.jsonl / TensorBoard."""
    match e:
        case RecordEvent(record=rec):
            sink.write(rec)  # with the rank's "time": when the step ended, not when this poll fetched it
            if rec.get("kind") is None and "loss" in rec:
                bar.n = rec["step"]
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec.get('tokens_per_s', 0):,.0f}",
                                mem=f"{rec.get('mem_gb', 0):.2f}G", refresh=False)
                bar.refresh()
        case LogEvent(line=line):
            bar.write(line)
        case StateEvent(state=state, detail=detail):
            bar.write(f"[controller] {state}{': ' + detail if detail else ''}")
        case PlacementEvent():
            bar.write(f"[placement] attempt {e.attempt}: {e.plan} — {e.summary}")
        case RecoveryEvent():
            bar.write(f"[recovery] {e.cause} at step {e.step} ({e.detail.splitlines()[0]}) → {e.decision}; "
                      f"plan {e.plan}")
            sink.write({"step": e.step, "kind": "recovery", "cause": e.cause, "decision": e.decision, "plan": e.plan})
        case GrowthEvent():
            figures = (f"; {e.tokens_per_s_before:,.0f} → {e.tokens_per_s_after:,.0f} tokens/s, first step "
                       f"{e.seconds:.1f} s after the re-plan" if e.stage == "measured" else
                       f"; {e.tokens_per_s_before:,.0f} tokens/s before" if e.stage == "replanned" else "")
            bar.write(f"[growth] {e.stage} at step {e.step}: {e.detail}{figures}")
            if e.stage in ("replanned", "measured"):
                sink.write({"step": e.step, "kind": "growth", "stage": e.stage, "plan_before": e.plan_before,
                            "plan_after": e.plan_after, "tokens_per_s_before": e.tokens_per_s_before,
                            "tokens_per_s_after": e.tokens_per_s_after, "replan_s": e.seconds})
        case ResumedEvent():
            bar.write(f"[recovery] resumed: step {e.step} completed {e.seconds:.1f} s after the failure")
            sink.write({"step": e.step, "kind": "resumed", "recovery_s": e.seconds})
