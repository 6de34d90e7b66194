"""``distgpt bench launcher``: ``distgpt train`` on the default launcher (an embedded Ray cluster) against
``--cluster.launcher=local`` (this process), end to end as a user runs them.

Each round runs the same command both ways, in alternating order (ABBA), and times the whole command — Ray's start
and shutdown included. Beside the wall clock it reads each run's own step throughput (the median of the
``tokens_per_s`` records after the first) and the time to its first completed step, so a gap can be told apart into
fixed cost and per-step cost — and, over 30 s of training, the share of the machine's CPU the training process got
and the share everything else took (``bench/cpu_share.py``): a steadier figure than throughput on a noisy VM, and the
reason for a per-step gap on a machine whose cores the one rank fills.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from distgpt.bench.cpu_share import CpuShare, measure
from distgpt.train.metrics import read_records

DEFAULT = ["--model.n_layer=4", "--model.n_embd=128", "--model.block_size=64", "--train.global_batch_size=12",
           "--plan.micro_batch_size=12", "--checkpoint.interval=0", "--train.progress=false"]
"""The job of the issue that found the slow default: 4 layers, 128 wide, block 64, batch 12."""


@dataclass(frozen=True)
class Run:
    """One timed command."""

    launcher: str
    wall_s: float
    first_step_s: float
    tokens_per_s: float
    cpu: CpuShare | None
    """The machine's CPU over 30 s of training: the training process's share and the rest's."""


def _one(job: str, overrides: list[str], launcher: str, out: str) -> Run:
    cmd = [sys.executable, "-m", "distgpt.cli", "train", job, *DEFAULT, *overrides, f"--run.out_dir={out}"]
    if launcher == "local":
        cmd.append("--cluster.launcher=local")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        cpu = measure(proc, launcher == "ray")
        code = proc.wait()
        wall = time.time() - t0
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{launcher} run failed: {err.read().strip().splitlines()[-1:]}")
    recs = read_records(out)
    steps = [r for r in recs if r.get("kind") is None and "tokens_per_s" in r]
    tps = statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)
    return Run(launcher, wall, steps[0]["time"] - t0, tps, cpu)


def _cpu(r: Run) -> str:
    c = r.cpu
    return "" if c is None else (f"; CPU: the trainer {c.trainer:.1%}, the rest {c.others:.1%}; the trainer "
                                 f"preempted {c.preempted_per_s:,.0f}/s, other threads woke {c.wakeups_per_s:,.0f}/s")


def _geo(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def run(job: str, overrides: list[str], steps: int, rounds: int) -> int:
    """``rounds`` ABBA pairs of ``steps``-step runs; print each run and the ratios."""
    extra = [*overrides, f"--train.max_steps={steps}"]
    runs: list[tuple[Run, Run]] = []
    print(f"distgpt train {job} {' '.join(DEFAULT + extra)}: default (Ray) vs --cluster.launcher=local, "
          f"{rounds} alternated pairs")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = ("local", "ray") if i % 2 == 0 else ("ray", "local")
            got = {k: _one(job, extra, k, f"{tmp}/{i}-{k}") for k in order}
            runs.append((got["local"], got["ray"]))
            for k in order:
                r = got[k]
                print(f"  round {i + 1} {k:5s}: {r.wall_s:6.1f} s whole command, first step at {r.first_step_s:5.1f} s,"
                      f" {r.tokens_per_s:,.0f} tokens/s{_cpu(r)}", flush=True)
    wall = [lo.wall_s / ra.wall_s for lo, ra in runs]
    tps = [ra.tokens_per_s / lo.tokens_per_s for lo, ra in runs]
    fixed = statistics.median(ra.first_step_s - lo.first_step_s for lo, ra in runs)
    ray_s, local_s = _geo([ra.wall_s for _, ra in runs]), _geo([lo.wall_s for lo, _ in runs])
    print(f"end to end: Ray {ray_s:.1f} s vs local {local_s:.1f} s → {_geo(wall):.3f}× "
          f"(pairs {', '.join(f'{x:.3f}' for x in wall)}; goal ≥ 0.95)")
    print(f"per step: Ray / local tokens/s {_geo(tps):.3f}× (pairs {', '.join(f'{x:.3f}' for x in tps)}); "
          f"first step {fixed:+.1f} s later on Ray (median)")
    shares = [(lo.cpu, ra.cpu) for lo, ra in runs if lo.cpu and ra.cpu]
    if shares:
        def mean(xs) -> str:
            return f"{statistics.fmean(xs):.1%}"

        ratio = _geo([ra.trainer / lo.trainer for lo, ra in shares])
        print(f"CPU share of the training process: Ray / local {ratio:.3f}× (Ray: the rank "
              f"{mean(ra.trainer for _, ra in shares)}, everything else {mean(ra.others for _, ra in shares)}; "
              f"local: the trainer {mean(lo.trainer for lo, _ in shares)}, everything else "
              f"{mean(lo.others for lo, _ in shares)})")

        def rate(xs) -> str:
            return f"{statistics.fmean(xs):,.0f}/s"

        print(f"wake-ups: other threads woke {rate(ra.wakeups_per_s for _, ra in shares)} beside the rank, "
              f"{rate(lo.wakeups_per_s for lo, _ in shares)} beside the local trainer; the training threads were "
              f"preempted {rate(ra.preempted_per_s for _, ra in shares)} on Ray, "
              f"{rate(lo.preempted_per_s for lo, _ in shares)} locally")
    return 0
