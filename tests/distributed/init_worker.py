"""Run under torchrun: build the GPT on the meta device under each Plan given, let every rank make only its part,
gather the whole model and write, per Plan, whether it equals a one-process initialisation with the same seed
bit for bit — and, built again from trained weights (``init.from``: a model directory with a 2-token-smaller
vocabulary, read one tensor at a time), whether it equals those weights grown as one process grows them; and
from a sharded checkpoint of them (a checkpoint root, which DCP reads into each rank's shards), and from a sharded
checkpoint of the 258-token model itself (its vocabulary grown as it is read)
(``tests/distributed/test_meta_init.py``)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from distgpt.checkpoint.export import model_tensors, save_model_dir
from distgpt.checkpoint.manager import CheckpointManager
from distgpt.data.tokenizer import ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.parallel import OptimSettings, full_state_dict, parallelize
from distgpt.parallel.mesh import build_mesh, init_distributed
from distgpt.planner.plan import Plan
from distgpt.train.init import grow_rows, open_initial
from distgpt.train.objectives import resolve

SEED = 1234
CFG = GPTConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=260, block_size=16)


def _trained(where: str) -> dict[str, torch.Tensor]:
    """Rank 0 writes a 'trained' model (another seed, vocabulary 258) to ``where``; every rank gets the full
    weights one process would start from (vocabulary grown to 260: new rows the mean of the old)."""
    small = GPTConfig(**{**CFG.to_dict(), "vocab_size": 258})
    torch.manual_seed(SEED + 1)
    trained = GPT(small)
    if dist.get_rank() == 0:
        save_model_dir(where, trained, small, ByteTokenizer())
    dist.barrier()
    sd = model_tensors(trained)
    sd["tok_emb.weight"] = grow_rows(sd["tok_emb.weight"], CFG.vocab_size)
    return sd


def _engine(plan: Plan, cfg: GPTConfig = CFG, **init):
    with torch.device("meta"):
        model = GPT(cfg)
    return parallelize(model, build_mesh(plan), OptimSettings(1e-3, 0.0, (0.9, 0.95), 1.0, 8, 16), resolve("lm"),
                       **init)


def _built(plan: Plan, **init) -> tuple[dict[str, torch.Tensor], int]:
    engine = _engine(plan, **init)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else  # a ZeRO-3 partition
                p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for m in engine.modules for p in m.parameters())
    return full_state_dict(engine), local


def main(out: str, plans: list[str]) -> None:
    init_distributed()
    torch.manual_seed(SEED)
    want = {k: v for k, v in GPT(CFG).state_dict().items() if k != "lm_head.weight"}
    trained_dir = out + ".trained"
    trained = _trained(trained_dir)
    ckpt_root = out + ".ckpt"  # the trained weights (grown), saved sharded under the first Plan
    first = _engine(Plan.from_json(plans[0]), weights=open_initial(trained_dir, CFG)[0])
    CheckpointManager(ckpt_root).save(1, first, {"model": CFG.to_dict()})
    small = GPTConfig(**{**CFG.to_dict(), "vocab_size": 258})  # the trained weights as trained: vocabulary to grow
    small_root = out + ".small"
    first = _engine(Plan.from_json(plans[0]), small, weights=open_initial(trained_dir, small)[0])
    CheckpointManager(small_root).save(1, first, {"model": small.to_dict()})
    report = {}
    for text in plans:
        plan = Plan.from_json(text)
        got, local = _built(plan, seed=SEED)
        from_trained, _ = _built(plan, weights=open_initial(trained_dir, CFG)[0])
        report[plan.describe()] = {
            "same_names": sorted(got) == sorted(want),
            "bitwise_equal": all(torch.equal(got[k], want[k]) for k in want if k in got),
            "local_numel": local,
            "trained_equal": sorted(from_trained) == sorted(trained)
            and all(torch.equal(from_trained[k], trained[k]) for k in trained),
        }
        from_ckpt, _ = _built(plan, weights=open_initial(ckpt_root, CFG)[0])
        report[plan.describe()]["checkpoint_equal"] = sorted(from_ckpt) == sorted(trained) and all(
            torch.equal(from_ckpt[k], trained[k]) for k in trained)
        from_small, _ = _built(plan, weights=open_initial(small_root, CFG)[0])  # grown, slices kept per rank
        report[plan.describe()]["checkpoint_grown_equal"] = sorted(from_small) == sorted(trained) and all(
            torch.equal(from_small[k], trained[k]) for k in trained)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
