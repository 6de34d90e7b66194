"""``distgpt bench init``: peak host memory per rank while a model is set up, each rank making only its part (meta
device) against every rank building the whole model first (the way before) — under a pp × fsdp Plan, and under
DeepSpeed ZeRO-3 (made one module at a time, each partitioned by ``zero.Init`` as it is made).

Real widths (``gpt2-1.3b``: 2,048; ``6.7b``: 4,096) with fewer layers so the whole-model baseline fits this
machine; four ranks (dp 2 × pp 2, FSDP2; dp 4 ZeRO-3). Prints, per Plan, shape and mode, the largest rank's set-up
growth of its peak resident memory, the parameter bytes it keeps, and what the whole model would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from distgpt.bench.parallel_bench import _port
from distgpt.model.presets import param_count, preset
from distgpt.planner.plan import Plan

PLAN = Plan(dp=2, pp=2, dp_engine="fsdp", micro_batch_size=2)
ZERO3 = Plan(dp=4, dp_engine="deepspeed", zero_stage=3, micro_batch_size=2)
SHAPES = (("gpt2-1.3b", 4), ("6.7b", 2))
RUNS = ((PLAN, SHAPES), (ZERO3, SHAPES[:1]))


def measure(mode: str, name: str, layers: int, plan: Plan = PLAN) -> list[dict]:
    """Run the set-up once under torchrun; every rank's report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "init.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={plan.world_size}",
               "--master-addr=127.0.0.1", f"--master-port={_port()}", "-m", "distgpt.bench.init_worker", out, mode,
               plan.to_json(), name, str(layers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{mode} {name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(plan.world_size)]


def run(runs=RUNS) -> int:
    """Measure every Plan and shape in both modes (meta first: it is the lighter) and print the table."""
    gib = 2**30
    for plan, shapes in runs:
        print(f"plan: {plan.describe()} on {plan.world_size} ranks; peak host memory growth during set-up, "
              "largest rank")
        print(f"{'shape':<22}{'whole model':>12}{'mode':>7}{'peak growth':>13}{'kept':>9}{'set-up s':>10}")
        for name, layers in shapes:
            whole = param_count(replace(preset(name), n_layer=layers, block_size=256)) * 4 / gib
            rows = {}
            for mode in ("meta", "full"):
                reports = measure(mode, name, layers, plan)
                rows[mode] = max(r["after"] - r["before"] for r in reports) / gib
                kept = max(r["kept"] for r in reports) / gib
                setup = max(r["setup_s"] for r in reports)
                print(f"{name + f' ({layers} layers)':<22}{whole:>10.2f}Gi{mode:>7}{rows[mode]:>11.2f}Gi"
                      f"{kept:>7.2f}Gi{setup:>10.1f}")
            print(f"{'':<22}meta / full peak growth: {rows['meta'] / rows['full']:.2f}")
    return 0
