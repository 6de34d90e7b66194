"""``distgpt drill chaos``: one run with many faults at random steps and ranks, against the same run without any.

Faults are drawn (seeded) from ``kill`` (SIGKILL of a rank's actor), ``hang`` (a rank stops in a step: the
watchdog's case), ``preempt`` (a preemption notice for a rank's node: checkpoint, let the node go, re-plan without
it) and, when asked for (``--kinds``), ``remove`` (a rank's node dies without notice: its raylet is SIGKILLed, Ray
marks it dead after missed health checks, the run re-plans without it), each at a distinct step and a random rank.
Preemption and removal each come at most once, and last (in the order drawn): they change the Plan and take a node
out for good, and the faults before them are drawn for the first Plan's ranks; there are at most as many of them as
nodes with worker slots less one (something must be left to re-plan onto).

Without a re-plan both runs use the same Plan, so the faulty one must end **bitwise** equal: the same final
parameters, the same loss at every step, the same global samples at every step (each consumed exactly once — the
digest a trainer records per step). After a re-plan the arithmetic is reduced in another order, so parameters and
losses must be equal within the parity tolerance of ``tests/distributed`` (rtol 1e-4, atol 1e-6), and the samples
still exactly. Printed: each fault, each recovery with the time it cost (detection to the next completed step), and
the comparison. Node removal is opt-in because on a real cluster it takes the node out of Ray until its raylet is
started again (an autoscaler replaces it); it is never the driver's node, which hosts the controller.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from distgpt import storage
from distgpt.config import JobConfig
from distgpt.config_schema import ConfigError
from distgpt.errors import RunFailed
from distgpt.orchestrator.driver import run_on_ray
from distgpt.orchestrator.status import RunSummary

KINDS = ("kill", "hang", "preempt")
"""Drawn by default; ``remove`` is also drawn when asked for."""
ALL_KINDS = ("kill", "hang", "preempt", "remove")
REPLANS = ("preempt", "remove")
"""Faults that take a node out of the run (the run re-plans without it)."""
RTOL, ATOL = 1e-4, 1e-6
"""The parity tolerance (tests/distributed) a re-planned run is held to."""


def draw_faults(n: int, steps: int, world: int, seed: int, kinds: tuple[str, ...] = KINDS,
                replans: int = 1) -> list[str]:
    """``n`` fault specs (``kind@STEP:RANK``) at distinct steps in 1 .. steps-1, ranks and kinds drawn at random;
    each node-losing kind (preempt, remove) at most once and at most ``replans`` of them, moved to the last steps
    drawn, in the order they were first drawn."""
    if not 0 < n < steps:
        raise ConfigError([f"--faults: need 1 ≤ faults < train.max_steps ({steps}), got {n}"], "drill chaos")
    rng = random.Random(seed)
    at = sorted(rng.sample(range(1, steps), n))
    drawn = [(rng.choice(kinds), rng.randrange(world)) for _ in at]  # kind, rank per step: the order seeds rely on
    last = list(dict.fromkeys(k for k, _ in drawn if k in REPLANS))[:max(0, min(replans, n))]
    others = [x for x in kinds if x not in REPLANS] or ["kill"]
    drawn = [(others[i % len(others)] if k in REPLANS else k, r) for i, (k, r) in enumerate(drawn)]
    for j, k in enumerate(last):  # the node-losing ones last, each on the rank drawn for its step
        drawn[len(drawn) - len(last) + j] = (k, drawn[len(drawn) - len(last) + j][1])
    return [f"{k}@{s}:{r}" for (k, r), s in zip(drawn, at, strict=True)]


@dataclass
class ChaosReport:
    """Both runs and how they compare."""

    faults: list[str]
    reference: RunSummary
    chaos: RunSummary
    same_params: bool
    same_losses: bool
    same_samples: bool
    replanned: bool = False
    """Whether a recovery changed the Plan (then 'same' means within RTOL/ATOL, samples still exactly)."""

    @property
    def ok(self) -> bool:
        """Whether the faulty run ended exactly where the clean one did."""
        return self.chaos.state == "finished" and self.same_params and self.same_losses and self.same_samples

    def lines(self) -> list[str]:
        """What to print."""
        out = [f"faults: {', '.join(self.faults)}"]
        for r in self.chaos.recoveries:
            cost = f"{r.recovery_s:.1f} s" if r.recovery_s is not None else "never resumed"
            out.append(f"  recovery: {r.cause} at step {r.step} → {r.decision}; {cost} to the next step")
        lost = sum(r.recovery_s or 0.0 for r in self.chaos.recoveries)
        out.append(f"{len(self.chaos.recoveries)} recoveries, {lost:.1f} s lost in all")
        near = f"equal within rtol {RTOL:g}, atol {ATOL:g} (re-planned)" if self.replanned else "bitwise equal"
        for what, same, how in (("final parameters", self.same_params, near),
                                ("loss at every step", self.same_losses, near),
                                ("samples at every step", self.same_samples, "bitwise equal")):
            out.append(f"{what}: {how if same else 'DIFFERENT'} to the run without faults")
        return out


def run_chaos(job: JobConfig, n: int, seed: int, log=print, kinds: tuple[str, ...] = KINDS) -> ChaosReport:
    """The reference run, then the faulty one (each in its own out_dir and checkpoint root under the job's)."""
    steps, world = job.train.max_steps, job.plan.world_size
    kinds, replans = _possible(kinds, job.cluster.cpus_per_worker, log)
    faults = draw_faults(n, steps, world, seed, kinds, replans)
    if not job.checkpoint.interval:
        raise ConfigError(["checkpoint.interval: the chaos drill needs checkpoints (e.g. --checkpoint.interval=2)"],
                          "drill chaos")
    runs, stamp = {}, int(time.time())
    for name, inject in (("reference", []), ("chaos", faults)):
        out = str(Path(job.out_dir) / f"chaos-{name}")
        (Path(out) / "metrics.jsonl").unlink(missing_ok=True)  # appended to by each run: only this one's counts
        fresh = storage.join(job.checkpoint_uri, f"chaos-{name}-{stamp}")  # recoveries resume from here, no stale one
        j = dataclasses.replace(
            job, run=dataclasses.replace(job.run, out_dir=out),
            checkpoint=dataclasses.replace(job.checkpoint, uri=fresh, resume="auto"),
            cluster=dataclasses.replace(job.cluster, inject=inject, max_failures=max(job.cluster.max_failures, n),
                                        hang_timeout_s=min(job.cluster.hang_timeout_s, 10.0)))
        log(f"[chaos] {name} run{': ' + ', '.join(inject) if inject else ''}")
        try:
            runs[name] = (run_on_ray(j, log=log), Path(out))
        except RunFailed as e:
            raise RunFailed(f"chaos drill: the {name} run failed: {e}") from None
    (ref, ref_dir), (hurt, hurt_dir) = runs["reference"], runs["chaos"]
    a, b = step_records(ref_dir), step_records(hurt_dir)
    replanned = any(r.decision == "replan" for r in hurt.recoveries)
    tol = (RTOL, ATOL) if replanned else (0.0, 0.0)
    close = (lambda x, y: abs(x - y) <= tol[1] + tol[0] * abs(y))  # noqa: E731
    return ChaosReport(faults, ref, hurt, _same_weights(ref_dir, hurt_dir, *tol),
                       sorted(a) == sorted(b) and all(close(b[s]["loss"], a[s]["loss"]) for s in a),
                       sorted(a) == sorted(b) and all(a[s]["samples"] == b[s]["samples"] for s in a), replanned)


def _possible(kinds: tuple[str, ...], cpus_per_worker: float, log) -> tuple[tuple[str, ...], int]:
    """The kinds this cluster can drill and how many node-losing faults it can take (nodes with slots less one;
    a removal also needs a node other than the driver's, which hosts the controller)."""
    import ray

    from distgpt.orchestrator.inventory import ray_nodes

    bad = sorted(set(kinds) - set(ALL_KINDS))
    if bad or not kinds:
        raise ConfigError([f"--kinds: {', '.join(bad) or 'none given'} — choose from {', '.join(ALL_KINDS)}"],
                          "drill chaos")
    nodes = ray_nodes(cpus_per_worker)
    here = ray.get_runtime_context().get_node_id()
    if "remove" in kinds and not any(node.node_id != here for node in nodes):
        kinds = tuple(k for k in kinds if k != "remove")
        log("[chaos] no node with worker slots besides the driver's: no node removal drawn (the driver's node hosts "
            "the controller)")
    if len(nodes) < 2 and any(k in REPLANS for k in kinds):  # losing the only node leaves nothing to re-plan onto
        kinds = tuple(k for k in kinds if k not in REPLANS)
        log("[chaos] one node with worker slots: no preemption or node removal drawn (nothing left to re-plan onto)")
    return kinds or ("kill",), max(0, len(nodes) - 1)


def step_records(out: Path) -> dict[int, dict]:
    """The last training record of each step (a step redone after a recovery replaces the lost attempt's)."""
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") is None and "loss" in r:
            recs[r["step"]] = r
    return recs


def _same_weights(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    if rtol == atol == 0.0:
        return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
    return x.keys() == y.keys() and all(torch.allclose(y[k], x[k], rtol=rtol, atol=atol) for k in x)
