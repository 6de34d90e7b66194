"""Run under torchrun: build the GPT on the meta device under each Plan given, let every rank make only its part,
gather the whole model and write, per Plan, whether it equals a one-process initialisation with the same seed
bit for bit (``tests/distributed/test_meta_init.py``)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.parallel import OptimSettings, full_state_dict, parallelize
from distgpt.parallel.mesh import build_mesh, init_distributed
from distgpt.planner.plan import Plan
from distgpt.train.objectives import resolve

SEED = 1234
CFG = GPTConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=260, block_size=16)


def main(out: str, plans: list[str]) -> None:
    init_distributed()
    torch.manual_seed(SEED)
    want = {k: v for k, v in GPT(CFG).state_dict().items() if k != "lm_head.weight"}
    report = {}
    for text in plans:
        plan = Plan.from_json(text)
        with torch.device("meta"):
            model = GPT(CFG)
        engine = parallelize(model, build_mesh(plan), OptimSettings(1e-3, 0.0, (0.9, 0.95), 1.0, 8, 16),
                             resolve("lm"), seed=SEED)
        got = full_state_dict(engine)
        report[plan.describe()] = {
            "same_names": sorted(got) == sorted(want),
            "bitwise_equal": all(torch.equal(got[k], want[k]) for k in want if k in got),
            "local_numel": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                               for m in engine.modules for p in m.parameters()),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
