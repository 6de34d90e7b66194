"""``distgpt drill chaos``: one run with many faults at random steps and ranks, against the same run without any.

Faults are drawn (seeded) from ``kill`` (SIGKILL of a rank's actor) and ``hang`` (a rank stops in a step: the
watchdog's case), each at a distinct step and a random rank. Both runs use the same Plan, so the faulty one must end
**bitwise** equal: the same final parameters, the same loss at every step, and the same global samples at every step
(each consumed exactly once — the digest a trainer records per step). Printed: each fault, each recovery with the
time it cost (detection to the next completed step), and the comparison. Faults that change the Plan (preemption,
node loss) are drilled by the orchestrator tests instead: a re-planned run equals the reference only within the
parity tolerance, not bitwise.
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

KINDS = ("kill", "hang")


def draw_faults(n: int, steps: int, world: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """``n`` fault specs (``kind@STEP:RANK``) at distinct steps in 1 .. steps-1, ranks and kinds drawn at random."""
    if not 0 < n < steps:
        raise ConfigError([f"--faults: need 1 ≤ faults < train.max_steps ({steps}), got {n}"], "drill chaos")
    rng = random.Random(seed)
    at = sorted(rng.sample(range(1, steps), n))
    return [f"{rng.choice(kinds)}@{s}:{rng.randrange(world)}" for s in at]


@dataclass
class ChaosReport:
    """Both runs and how they compare."""

    faults: list[str]
    reference: RunSummary
    chaos: RunSummary
    same_params: bool
    same_losses: bool
    same_samples: bool

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
        for what, same in (("final parameters", self.same_params), ("loss at every step", self.same_losses),
                           ("samples at every step", self.same_samples)):
            out.append(f"{what}: {'bitwise equal' if same else 'DIFFERENT'} to the run without faults")
        return out


def run_chaos(job: JobConfig, n: int, seed: int, log=print) -> ChaosReport:
    """The reference run, then the faulty one (each in its own out_dir and checkpoint root under the job's)."""
    steps, world = job.train.max_steps, job.plan.world_size
    faults = draw_faults(n, steps, world, seed)
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
    return ChaosReport(faults, ref, hurt, _same_weights(ref_dir, hurt_dir),
                       sorted(a) == sorted(b) and all(a[s]["loss"] == b[s]["loss"] for s in a),
                       sorted(a) == sorted(b) and all(a[s]["samples"] == b[s]["samples"] for s in a))


def step_records(out: Path) -> dict[int, dict]:
    """The last training record of each step (a step redone after a recovery replaces the lost attempt's)."""
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") is None and "loss" in r:
            recs[r["step"]] = r
    return recs


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
