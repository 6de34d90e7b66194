"""One rank of ``distgpt bench init``: set a model up under a Plan, from the meta device or (as before) by building
the whole model first, and report this rank's peak host memory.

Run under torchrun: ``python -m distgpt.bench.init_worker OUT_JSON MODE PLAN_JSON PRESET LAYERS``. MODE is ``meta``
(each rank makes only its part) or ``full`` (every rank builds the whole model, then keeps its part). Every rank
writes OUT_JSON.rank<k>: peak resident bytes before and after set-up, and the parameter bytes it keeps.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from distgpt.model.gpt import GPT
from distgpt.model.presets import preset
from distgpt.parallel import OptimSettings, parallelize
from distgpt.parallel.mesh import build_mesh, init_distributed, shutdown_distributed
from distgpt.planner.plan import Plan
from distgpt.train.objectives import resolve


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kept_bytes(engine) -> int:
    """Bytes of the parameters this rank holds (DTensors by their local shard, ZeRO-3 by its partition)."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p).numel()
               * 4 for m in engine.modules for p in m.parameters())


def main(out: str, mode: str, plan_json: str, name: str, layers: int) -> None:
    init_distributed()
    plan = Plan.from_json(plan_json)
    cfg = replace(preset(name), n_layer=layers, block_size=256)  # block size: the position table only
    mesh = build_mesh(plan)
    before = peak_rss()
    start = time.perf_counter()
    torch.manual_seed(0)
    if mode == "meta":
        with torch.device("meta"):
            model = GPT(cfg)
    else:
        model = GPT(cfg)
    engine = parallelize(model, mesh, OptimSettings(1e-3, 0.0, (0.9, 0.95), 1.0, 8, 64), resolve("lm"), seed=0)
    del model
    report = {"before": before, "after": peak_rss(), "kept": kept_bytes(engine),
              "setup_s": time.perf_counter() - start, "rank": dist.get_rank()}
    with open(f"{out}.rank{dist.get_rank()}", "w") as f:
        json.dump(report, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
