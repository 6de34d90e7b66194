"""No rank materialises the whole model: same seed ⇒ the same full model, bit for bit, whatever the Plan; the same
holds for trained weights (``init.from``), which each rank reads one tensor at a time.

Each rank builds the GPT on the meta device and makes only the parameters it keeps; gathering them gives exactly
the tensors of a one-process ``GPT`` seeded alike, and each rank holds only its share of the elements."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distgpt.model.config import GPTConfig
from distgpt.model.presets import param_count
from distgpt.planner.plan import Plan

from ..conftest import REPO
from .test_parity import free_port

PLANS = {
    2: [Plan(dp=2, dp_engine="fsdp"), Plan(tp=2), Plan(pp=2, micro_batch_size=2),
        Plan(pp=2, schedule="interleaved-1f1b", virtual_stages=2, micro_batch_size=2),
        Plan(dp=2, dp_engine="deepspeed", zero_stage=3), Plan(dp=2)],
    4: [Plan(dp=2, tp=2), Plan(dp=2, pp=2, dp_engine="fsdp", micro_batch_size=2)],
    8: [Plan(dp=2, tp=2, pp=2, dp_engine="fsdp", micro_batch_size=2)],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", list(PLANS))
def test_every_plan_initialises_the_one_process_model_bit_for_bit(world, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(REPO / "tests" / "distributed" / "init_worker.py"), str(out),
           *(p.to_json() for p in PLANS[world])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert len(report) == len(PLANS[world])
    whole = param_count(GPTConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=260, block_size=16))
    for plan in PLANS[world]:
        row = report[plan.describe()]
        assert row["same_names"] and row["bitwise_equal"], (plan.describe(), row)
        assert row["trained_equal"], (plan.describe(), row)  # init.from, sharded the same way, vocabulary grown
        assert row["checkpoint_equal"], (plan.describe(), row)  # init.from a checkpoint root saved under another Plan
        assert row["checkpoint_grown_equal"], (plan.describe(), row)  # … whose vocabulary grows (258 → 260)
        sharded = plan.tp > 1 or plan.pp > 1 or (plan.dp > 1 and plan.dp_engine == "fsdp") or plan.zero_stage == 3
        if sharded:  # rank 0 holds its part only (DDP replicas hold all)
            assert row["local_numel"] < 0.75 * whole, (plan.describe(), row)
