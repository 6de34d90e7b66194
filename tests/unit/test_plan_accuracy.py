"""The cost model against published measured runs (``distgpt bench plan-accuracy --table``), the layer-time model's
terms, size-aware communication, and bad tables."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import pytest

from distgpt.cli import main
from distgpt.planner import cost
from distgpt.planner.accuracy import (
    PUBLISHED,
    Scored,
    TableError,
    calibrate_one,
    kendall_tau,
    load_table,
    run_inputs,
    score_run,
    summarize,
)
from distgpt.planner.collectives import Hops, allgather, allreduce, library_hops
from distgpt.planner.cost import DeviceModel
from distgpt.planner.efficiency import FITTED, GENERIC, Efficiency, efficiency_for, layer_seconds
from distgpt.planner.efficiency_fit import START, fit, generic, nelder_mead
from distgpt.planner.evaluate import predict
from distgpt.planner.hardware import CATALOG


@pytest.fixture(scope="module")
def runs():
    return load_table(PUBLISHED)


def test_the_shipped_table_names_a_source_for_every_run_and_holds_out_what_it_does_not_fit(runs):
    assert len(runs) >= 150 and all(r.source.startswith("https://") for r in runs)
    held = [r for r in runs if r.split == "held_out"]
    # every multi-node run and every run of a type without its own fit is held out
    assert all(r.split == "held_out" for r in runs if r.nodes > 1 or r.device not in FITTED)
    assert {r.device for r in held} - set(FITTED) == {"A100-40GB", "V100-16GB"}


def test_held_out_error_meets_the_goals_uncalibrated_and_calibrated_on_one_run(runs):
    # the goals are stated for published multi-node runs: every one of them is held out; they hold for the
    # system the figures describe (a PyTorch FSDP one) — Megatron-LM's rows are scored below, not held to them
    held = [r for r in runs if r.split == "held_out" and r.nodes > 1 and "llm-foundry" in r.source]
    fresh = [r for r in held if r.device not in FITTED]  # a type the figures never saw
    assert len(fresh) >= 30
    s = summarize([score_run(r) for r in fresh])
    assert s.step_mean < 0.15, s
    small, model = calibrate_one(runs, "A100-40GB")
    rest = [score_run(r, {"A100-40GB": model}) for r in fresh if r != small]
    assert summarize(rest).step_mean < 0.08
    assert summarize([score_run(r) for r in held if r.device in FITTED]).step_mean < 0.08


def test_the_catalog_figures_are_what_the_fit_gives(runs):
    fitted = fit([r for r in runs if r.split == "fit"], START)
    assert set(fitted) == set(FITTED)
    for dev, e in fitted.items():
        for k in ("gemm", "attention", "width_half", "memory_passes"):
            assert getattr(e, k) == pytest.approx(getattr(FITTED[dev], k), rel=0.01), (dev, k)
    g = generic(fitted)
    assert g.gemm == pytest.approx(GENERIC.gemm, rel=0.01) and g.attention == pytest.approx(GENERIC.attention, rel=0.01)
    assert efficiency_for("L4") == GENERIC and efficiency_for("cpu") is None


def test_nelder_mead_finds_a_minimum():
    x = nelder_mead(lambda v: (v[0] - 3) ** 2 + (v[1] + 1) ** 2 + 2, [0.0, 0.0], step=1.0)
    assert x == pytest.approx([3, -1], abs=1e-3)


def test_layer_time_terms_behave_as_the_hardware_does():
    e = Efficiency(gemm=0.8, attention=0.5, width_half=500, memory_passes=10, kernel_s=2e-4)
    kw = dict(seq=2048, ffn=4 * 4096, heads=32, tp=1, act_bytes=2, recompute=False, flash=True)

    def achieved(width: int, tokens: float, **over) -> float:
        args = {**kw, "ffn": 4 * width, **over}
        t = layer_seconds(e, 312e12, 2e12, tokens=tokens, width=width, **args)
        return 6 * tokens * 12 * width * width / args["tp"] / t

    assert achieved(768, 16384) < achieved(4096, 16384) < 312e12 * 0.8  # narrow GEMMs run further from peak
    assert achieved(4096, 64) < 0.5 * achieved(4096, 16384)  # a tiny micro-batch is launch-bound
    assert achieved(4096, 16384, tp=4) < achieved(4096, 16384)  # a tensor-parallel shard is a narrower GEMM
    base = layer_seconds(e, 312e12, 2e12, tokens=8192, width=4096, **kw)
    assert layer_seconds(e, 312e12, 2e12, tokens=8192, width=4096, **{**kw, "recompute": True}) == \
        pytest.approx(base * 4 / 3)
    assert layer_seconds(e, 312e12, 2e12, tokens=8192, width=4096, **{**kw, "flash": False}) > base


HOP = Hops(0.0, 1e-5, 1e-5)  # a measured 10 µs per hop, as a profile gives it


def test_gradient_reduction_overlaps_only_where_the_engine_overlaps_it():
    args = dict(params=1e9, dp=8, bw=100e9, hops=HOP, n_micro=1, backward_last=1.0, compute_micro=1.5,
                overlap=0.8)
    ddp = cost.dp_time(engine="ddp", zero=0, **args)
    zero2 = cost.dp_time(engine="deepspeed", zero=2, **args)
    full = allreduce(4e9, 8, 1, 100e9, HOP)
    assert zero2 >= full > ddp  # ZeRO-1/2 reduce after backward (overlap_comm off); DDP's buckets hide most
    assert cost.dp_time(engine="ddp", zero=0, pp=2, **args) >= full  # stages all-reduce after the schedule


def test_many_small_messages_cost_their_latency():
    # same bytes: FSDP's per-layer collectives pay one latency per hop per layer, DDP one per 25 MiB bucket
    args = dict(params=1e8, engine="fsdp", zero=0, dp=64, bw=1e12, n_micro=1, backward_last=0.0, compute_micro=0.0,
                overlap=0.0)
    few = cost.dp_time(hops=HOP, layers=1, **args)
    many = cost.dp_time(hops=HOP, layers=48, **args)
    assert many - few == pytest.approx(3 * 47 * 63 * 1e-5)  # gather forward + backward, reduce-scatter
    bf16 = cost.dp_time(hops=Hops(0, 0, 0), gather_bytes=2, **args)
    fp32 = cost.dp_time(hops=Hops(0, 0, 0), gather_bytes=4, **args)
    assert bf16 < fp32
    small = cost.dp_time(1e6, "ddp", 0, 8, 1e12, HOP, 1, 0.0, 0.0, 0.0)
    assert small == pytest.approx(allreduce(4e6, 8, 1, 1e12, HOP))  # one bucket: latency-bound


def test_collective_latency_is_nccls_tuner_model_by_hand():
    nvlink, pcie = library_hops(CATALOG["H100-SXM"]), library_hops(CATALOG["L4"])
    us = 1e-6
    # one node of 8: a ring of 14 steps at 3.4 µs over NVLink; over PCIe (5.7 µs a step) the tree's 2·7 at 4 µs win
    assert allreduce(0, 8, 1, 1e12, nvlink) == pytest.approx((8.4 + 14 * 3.4) * us)
    assert allreduce(0, 8, 1, 1e12, pcie) == pytest.approx((8.4 + 2 * 7 * 4.0) * us)
    # 48 GPUs on 6 nodes: the ring's 94 steps (10 across nodes) cost 434 µs, NCCL's tree 2·(7·4 + ⌊log2 6⌋·14)
    assert allreduce(0, 48, 6, 1e12, nvlink) == pytest.approx((8.4 + 2 * (7 * 4.0 + 2 * 14)) * us)
    ring = (8.4 + 84 * 3.4 + 10 * 14) * us
    assert allreduce(4e9, 48, 6, 400e9, nvlink) == pytest.approx(ring + 2 * 47 / 48 * 4e9 / 400e9)  # bulk: ring
    assert allgather(0, 48, 6, 1e12, nvlink) == pytest.approx((8.4 + 42 * 3.4 + 5 * 14) * us)
    # a GPU profile measured on one node replaces the steps inside a node only; a CPU one every step
    measured = library_hops(CATALOG["H100-SXM"], 2e-6)
    assert (measured.intra, measured.inter, measured.base) == (2e-6, 14e-6, 0.0)
    assert library_hops(CATALOG["cpu"], 3e-5) == Hops(0.0, 3e-5, 3e-5)


def test_data_parallel_across_nodes_is_not_latency_bound(runs):
    """Megatron-LM's 1.7B model, data parallel over 48 H100s on 6 nodes, measured 0.45 s a step at 41% MFU: its
    25 MiB gradient buckets each pay NCCL's tree latency (~0.12 ms), not 94 ring hops at 20 µs (1.9 ms), which made
    the exposed reduction 0.39 s of a predicted 0.89 s."""
    row = next(r for r in runs if r.run.startswith("megatron gpt-1.7b"))
    plan, w, inv = run_inputs(row)
    c = predict(plan, w, inv, {}, check_memory=False)
    assert c.breakdown["data_parallel"] < 0.05 * c.step_time
    assert abs(score_run(row).step_error) < 0.2


def _row(runs, name: str):
    return next(r for r in runs if name in r.run)


def test_tensor_parallelism_across_nodes_talks_over_the_network(runs):
    """Megatron-LM's tensor parallelism over 16 V100s on 2 nodes (one 100 Gb/s NIC each) took 5.6 s a step:
    its all-reduces cross the network, not NVLink (scored over NVLink, the row was predicted at 1.0 s)."""
    row = _row(runs, "MP_1x16x1_16_3072x16")
    across = score_run(row).step_time_s
    one_node = score_run(replace(row, gpus_per_node=16, nodes=1)).step_time_s  # the same plan over NVLink
    assert across > 3 * one_node
    plan, w, inv = run_inputs(row)
    dev = DeviceModel(inv.groups[0].device)
    act = 2048 * 16 * 3072 * 2  # one all-reduce's bytes; 6 a layer with recomputation
    extra = 6 * (allreduce(act, 16, 2, 12.5e9, dev.hops) - allreduce(act, 16, 1, dev.link_bw, dev.hops))
    inside = cost.layer_time(w, dev, 16, 16, True)
    assert cost.layer_time(w, dev, 16, 16, True, tp_bw=12.5e9, tp_nodes=2) == pytest.approx(inside + extra)


def test_the_data_parallel_groups_of_a_node_share_its_network(runs):
    """Tensor parallel 8 inside each node, data parallel 2 across nodes: the node's 8 tensor-parallel ranks each
    all-reduce their own shard with their peer at once, over the node's one NIC — 1/8 of it each."""
    row = _row(runs, "2D_2x8x1_16_2304x24")
    plan, w, inv = run_inputs(row)
    dev = DeviceModel(inv.groups[0].device, comm_overlap=0.0)  # nothing hidden: the whole reduction shows
    c = predict(plan, w, inv, {row.device: dev}, check_memory=False)
    grads = cost.stage_params(w.model, 24, True, True, 8, 1) * cost.GRAD_B
    buckets = math.ceil(grads / cost.DDP_BUCKET_BYTES)
    shared = buckets * allreduce(grads / buckets, 2, 2, 12.5e9 / 8, dev.hops)
    assert c.breakdown["data_parallel"] == pytest.approx(shared)


def test_rank_agreement_over_plans_of_the_same_job(runs):
    """The choice a planner makes: plans for one job on one cluster (V100s, DLPerf), as Megatron-LM and as OneFlow
    ran them — a 1536×16 model, batch 16 on 8 GPUs (dp8, tp8, dp2×tp4, dp4×tp2) and a 2304×24 one, batch 512 on 32
    (tp8×pp4, dp2×tp4×pp4, dp2×tp8×pp2)."""
    for system in ("Megatron-LM 2021 (DLPerf)", "OneFlow (DLPerf)"):
        rows = [score_run(r) for r in runs if r.measured_by == system]
        jobs = {r.run.job_key for r in rows}
        assert len([k for k in jobs if sum(r.run.job_key == k for r in rows) >= 3]) == 2
        assert kendall_tau(rows, same_job=True) >= 0.8, system
    assert math.isnan(kendall_tau([score_run(r) for r in runs if "llm-foundry" in r.source], same_job=True))


def test_kendall_tau_counts_pairs_of_the_same_model_and_device(runs):
    same = [r for r in runs if r.model_key == runs[0].model_key and r.device == runs[0].device][:1]
    others = [r for r in runs if r.model_key == (24, 1024, 2048) and r.device == "A100-40GB"]
    assert len(others) >= 3
    right = [Scored(r, r.step_time_s, 0.0, True) for r in others + same]
    tokens = lambda r: r.global_batch * r.seq_len / (r.gpus_per_node * r.nodes)  # noqa: E731
    # predicted tokens/s per GPU = 1 / measured: every pair ordered the other way
    wrong = [Scored(r, tokens(r) * tokens(r) / r.step_time_s, 0.0, True) for r in others]
    assert kendall_tau(right) == 1.0 and kendall_tau(wrong) == -1.0
    assert math.isnan(kendall_tau(right[:1]))


def _table(tmp: Path, edit) -> str:
    rows = list(csv.DictReader(PUBLISHED.open()))[:3]
    edit(rows)
    path = tmp / "t.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [r.pop("seq_len") for r in rows], r"missing column\(s\) seq_len"),
    (lambda rows: rows[1].update(n_embd="wide"), r"t\.csv:3 column n_embd: 'wide' is not a int"),
    (lambda rows: rows[0].update(device="B300"), r"t\.csv:2 column device: unknown device type 'B300'"),
    (lambda rows: rows[0].update(dp="3"), r"t\.csv:2: dp×tp×pp = 3 but the cluster has"),
    (lambda rows: rows[0].update(step_time_s=""), r"t\.csv:2 column step_time_s: empty"),
])
def test_a_bad_table_is_one_clear_error(tmp_path, capsys, edit, message):
    import re

    path = _table(tmp_path, edit)
    with pytest.raises(TableError, match=message):
        load_table(path)
    assert main(["bench", "plan-accuracy", "--table", path]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_command_prints_fit_and_held_out_errors(capsys):
    assert main(["bench", "plan-accuracy", "--table"]) == 0
    out = capsys.readouterr().out
    assert "held_out" in out and "A100-40GB (generic)" in out and "calibrated on one run" in out
    assert main(["bench", "plan-accuracy"]) == 2  # neither a profile nor a table
    assert "--profile" in capsys.readouterr().err


def test_a_row_predicted_not_to_fit_is_still_scored(runs):
    r = next(r for r in runs if r.device == "A100-40GB")
    s = score_run(replace(r, micro_batch=r.micro_batch, global_batch=r.global_batch))
    assert s.step_time_s > 0 and s.memory_gib > 0


def test_the_attention_kernel_is_per_job_and_the_memory_model_follows_it():
    from distgpt.config import load_job
    from distgpt.config_schema import ConfigError
    from distgpt.planner.evaluate import Evaluator, Layout
    from distgpt.planner.inventory import inventory_from_dict

    from ..conftest import REPO

    tiny = str(REPO / "jobs" / "tiny.toml")
    assert load_job(tiny, []).workload().flash_attention is None  # auto: as the device type does
    math_w = load_job(tiny, ["--train.attention='math'"]).workload()
    flash_w = load_job(tiny, ["--train.attention='flash'"]).workload()
    assert (math_w.flash_attention, flash_w.flash_attention) == (False, True)
    with pytest.raises(ConfigError, match="train.attention: 'fast'"):
        load_job(tiny, ["--train.attention='fast'"])
    inv = inventory_from_dict({"nodes": [{"device": "A100-80GB", "count": 1}]})
    g = inv.groups[0]
    lay = Layout(1, 1, (math_w.model.n_layer,), (((g,), 1),), "replicas")
    mem = {w.flash_attention: Evaluator(w, inv, {}).memory(lay, 4, "ddp", 0, False, 1, 4)[0]["A100-80GB"]
           for w in (math_w, flash_w)}
    assert mem[False] > mem[True]  # the T×T scores are stored only without flash attention


def test_recomputation_holds_one_whole_layer_while_it_recomputes_it():
    from distgpt.model.presets import preset
    from distgpt.planner.evaluate import Evaluator, Layout
    from distgpt.planner.inventory import inventory_from_dict

    w = cost.Workload(preset("gpt2-350m"), 8, 1024, "bf16")
    inv = inventory_from_dict({"nodes": [{"device": "A100-80GB", "count": 1}]})
    lay = Layout(1, 1, (24,), (((inv.groups[0],), 1),), "replicas")
    ev = Evaluator(w, inv, {})
    rc = ev.memory(lay, 8, "ddp", 0, True, 1, 1)[0]["A100-80GB"]
    state = cost.state_bytes(cost.stage_params(w.model, 24, True, True, 1, 1), "ddp", 0, 1)
    kept = 24 * cost.layer_activation_bytes(w, 8, 1, True, True)
    whole = cost.layer_activation_bytes(w, 8, 1, False, True)
    overhead = ev.dev(inv.groups[0]).overhead
    copies = cost.autocast_weight_bytes(cost.stage_params(w.model, 24, True, True, 1, 1), "ddp", "bf16")
    assert rc == pytest.approx(state + copies + kept + whole + cost.logits_bytes(w, 8, 1) + overhead)


def _saved_per_layer(cfg, seq: int, dtype: str, attention: str) -> tuple[float, float]:
    """(bytes one Block keeps for backward per sample, bytes independent of the batch) with saved-tensor hooks,
    parameters excluded, from two batch sizes."""
    import torch

    from distgpt.model.gpt import Block, attention_kernels

    torch.manual_seed(0)
    block = Block(cfg)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    totals = []
    for b in (1, 3):
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(b, seq, cfg.n_embd, requires_grad=True)  # the fp32 residual stream
        auto = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
        with auto, attention_kernels(attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        totals.append(sum(seen.values()))
    per = (totals[1] - totals[0]) / 2
    return per, totals[0] - per


@pytest.mark.parametrize("dtype, attention", [("fp32", "flash"), ("fp32", "math"), ("bf16", "flash")])
@pytest.mark.parametrize("h, heads, seq", [(128, 4, 64), (192, 3, 128)])
def test_activation_memory_is_what_the_block_keeps(dtype, attention, h, heads, seq):
    from distgpt.model.config import GPTConfig

    cfg = GPTConfig(vocab_size=64, block_size=seq, n_layer=1, n_head=heads, n_embd=h)
    per, fixed = _saved_per_layer(cfg, seq, dtype, attention)
    w = cost.Workload(cfg, 1, seq, dtype)
    assert per == pytest.approx(cost.layer_activation_bytes(w, 1, 1, False, attention == "flash"), rel=0.01)
    params = 12 * h * h + 9 * h  # the block's weights and biases (LayerNorms' stay fp32)
    assert fixed == pytest.approx(2 * (12 * h * h + 4 * h) if dtype == "bf16" else 0, abs=4 * h * 8 + 64)
    assert cost.autocast_weight_bytes(params, "ddp", dtype) == pytest.approx(2 * params if dtype == "bf16" else 0)


@pytest.mark.parametrize("name, memory, catalog", [
    ("NVIDIA H100 80GB HBM3", 85e9, "H100-SXM"), ("NVIDIA H100 PCIe", 85e9, "H100-PCIe"),
    ("NVIDIA H200", 150e9, "H200"),
    ("NVIDIA A100-SXM4-80GB", 85e9, "A100-80GB"), ("NVIDIA A100-SXM4-40GB", 42e9, "A100-40GB"),
    ("NVIDIA L40S", 48e9, "L40S"), ("NVIDIA L4", 24e9, "L4"), ("NVIDIA A10G", 24e9, "A10G"),
    ("Tesla V100-SXM2-32GB", 34e9, "V100"), ("Tesla V100-SXM2-16GB", 17e9, "V100-16GB"), ("Tesla T4", 16e9, "T4"),
    ("NVIDIA GeForce RTX 4090", 25e9, "RTX4090"),
])
def test_a_gpu_as_cuda_names_it_maps_to_its_catalog_entry(name, memory, catalog):
    from distgpt.planner.hardware import cuda_device_type

    assert cuda_device_type(name, memory) == catalog and catalog in CATALOG


def test_an_uncatalogued_gpu_is_named_with_the_fix():
    from distgpt.planner.hardware import cuda_device_type

    with pytest.raises(KeyError, match="'NVIDIA B300' is not in distgpt's device catalog"):
        cuda_device_type("NVIDIA B300", 288e9)
