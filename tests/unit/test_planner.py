"""The planner: formulas by hand, search constraints, heterogeneity, infeasibility, profiles, inventories, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from distgpt.cli import main
from distgpt.model.presets import layer_params, param_count, preset
from distgpt.planner import cost
from distgpt.planner.calibrate import DeviceProfile, device_models, load_measured, load_profile, save_profile
from distgpt.planner.collectives import Hops, allreduce
from distgpt.planner.cost import DeviceModel, Workload
from distgpt.planner.evaluate import Evaluator, predict
from distgpt.planner.explain import explain, nothing_fits
from distgpt.planner.hardware import CATALOG, device_type
from distgpt.planner.inventory import InventoryError, inventory_from_dict, load_inventory
from distgpt.planner.plan import Plan
from distgpt.planner.search import layouts, search, speed_layers

from ..conftest import REPO

GPT2 = preset("gpt2-124m")
B13 = preset("gpt2-1.3b")


def inv(*groups, inter_site=1.25):
    return inventory_from_dict({"inter_site_gbps": inter_site, "nodes": [dict(g) for g in groups]})


def test_catalog_has_the_required_devices_and_aliases():
    for name in ("H200", "H100-SXM", "H100-PCIe", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "V100", "T4",
                 "RTX4090", "RTX3090", "cpu"):
        assert name in CATALOG
    assert device_type("h100").name == "H100-SXM" and device_type("A100-SXM4-40GB").name == "A100-40GB"
    assert CATALOG["H100-SXM"].bf16_flops == 989e12 and CATALOG["A100-40GB"].memory_bytes == 40e9
    with pytest.raises(KeyError, match="unknown device type 'B300'"):
        device_type("B300")


def test_state_memory_by_zero_stage_by_hand():
    n = 1e9
    assert cost.state_bytes(n, "ddp", 0, 8) == 16e9
    assert cost.state_bytes(n, "deepspeed", 1, 8) == 4e9 + 4e9 + 8e9 / 8
    assert cost.state_bytes(n, "deepspeed", 2, 8) == 4e9 + 12e9 / 8
    assert cost.state_bytes(n, "deepspeed", 3, 8) == cost.state_bytes(n, "fsdp", 0, 8) == 2e9


def test_activation_memory_by_hand():
    # Korthikanti et al.'s per-element count for this model's Block (the measured check is in test_plan_accuracy):
    # bf16: LayerNorm inputs 8 (fp32 residual), q/k/v inputs 3×2, q/k/v 6, attention output 2, fc1 input 2, GELU 16
    w = Workload(B13, 8, 2048, "bf16")
    s, b, h, a = 2048, 1, 2048, 16
    assert cost.layer_activation_bytes(w, 1, 1, False, flash=True) == s * b * h * 40
    assert cost.layer_activation_bytes(w, 1, 1, False, flash=False) == s * b * h * (40 + 4 * a * s / h)
    assert cost.layer_activation_bytes(w, 1, 4, False, flash=False) == s * b * h * (16 + (24 + 4 * a * s / h) / 4)
    assert cost.layer_activation_bytes(w, 1, 1, True, flash=True) == 4 * s * b * h  # the fp32 block input
    fp32 = Workload(B13, 8, 2048, "fp32")
    assert cost.layer_activation_bytes(fp32, 1, 1, False, flash=True) == s * b * h * 64
    assert cost.in_flight("1f1b", 0, 4, 8) == 4 and cost.in_flight("1f1b", 3, 4, 8) == 1
    assert cost.in_flight("gpipe", 3, 4, 8) == 8


def test_fsdp_inside_pipeline_stages_holds_gathered_weights_and_gradients_by_hand():
    n = 1e9  # gathered weights + gradients from the first micro-batch to the last backward, sharded master + Adam
    assert cost.state_bytes(n, "fsdp", 0, 8, pp=2) == 4e9 * (1 + 1 / 8) + 4e9 + 8e9 / 8
    assert cost.state_bytes(n, "fsdp", 0, 8, pp=1) == 2e9
    # and it gathers once per step, not once per micro-batch as FSDP2 without pipeline stages does
    args = (n, "fsdp", 0, 8, 25e9, Hops(0.0, 1e-5, 1e-5), 16, 0.0, 0.0, 0.0)
    assert cost.dp_time(*args, pp=2) < cost.dp_time(*args, pp=1) / 8


def test_setup_memory_is_the_kept_weights_plus_the_largest_full_tensor_by_hand():
    n = 1e9
    assert cost.setup_bytes(B13, n, "fsdp", 0, 8) == n / 8 * 4 + 50257 * 2048 * 4
    assert cost.setup_bytes(B13, n, "ddp", 0, 8) == n * 4 + 50257 * 2048 * 4
    # a huge vocabulary sharded 64 ways: set-up (one whole embedding at a time) is the peak the planner must see
    big = replace(B13, vocab_size=256_000, n_embd=8192, n_head=64, n_layer=2)
    w = Workload(big, 64, 128, "bf16")
    ev = Evaluator(w, inv({"device": "H100-SXM", "count": 8, "replicas": 8}), {})
    lay = next(lay for lay in layouts(ev, ev.inv.groups) if lay.tp == 1 and lay.pp == 1)
    mem, _, params = ev.memory(lay, 1, "fsdp", 0, True, 64, 1)
    overhead = ev.dev(ev.inv.groups[0]).overhead
    assert mem["H100-SXM"] == pytest.approx(cost.setup_bytes(big, params, "fsdp", 0, 64) + overhead)
    assert cost.state_bytes(params, "fsdp", 0, 64) < 0.2 * mem["H100-SXM"]  # training states alone are far less


def test_the_search_considers_ddp_with_tp_and_fsdp_with_pipeline_stages():
    model = replace(B13, vocab_size=50304)  # TP splits the vocabulary: padded to a multiple of 64, as Megatron-LM does
    w = Workload(model, 64, 2048, "bf16")
    res = search(w, inv({"device": "A100-40GB", "count": 8, "replicas": 2}), top=10**6, every_option=True)
    shapes = {(c.plan.dp > 1, c.plan.tp > 1, c.plan.pp > 1, c.plan.dp_engine) for c in res.ranked}
    for shape in [(True, True, False, "ddp"), (True, False, True, "fsdp"), (True, True, True, "fsdp")]:
        assert shape in shapes, shape
    assert all(c.plan.problems(model, None, 64) == [] for c in res.ranked)
    # the common shape wins where it should: nodes of 4 GPUs joined by a slow network (10 GB/s), a model whose
    # states need sharding or splitting, gradient accumulation (8 micro-batches a step, each of which FSDP2 would
    # gather its weights for; DDP reduces once) — data parallel across nodes, tensor parallel inside, DDP
    slow = inv({"device": "A100-40GB", "count": 4, "replicas": 2, "network_gbps": 10})
    best = search(replace(w, global_batch=256), slow).ranked[0].plan
    assert (best.dp_engine, best.dp > 1, best.tp > 1, best.pp) == ("ddp", True, True, 1), best.describe()


def test_stage_params_sum_to_the_model():
    assert cost.stage_params(GPT2, 12, True, True, 1, 1) == param_count(GPT2)
    first = cost.stage_params(GPT2, 6, True, False, 1, 2)
    last = cost.stage_params(GPT2, 6, False, True, 1, 2)
    assert first + last == param_count(GPT2) + GPT2.vocab_size * GPT2.n_embd  # the tied head is a second copy


def test_layer_time_uses_flops_and_tp_communication():
    w = Workload(GPT2, 8, 1024, "bf16")
    dev = DeviceModel(CATALOG["H100-SXM"], achieved_flops=400e12)
    flops = 1024 * (6 * layer_params(GPT2) + 12 * 768 * 1024)
    assert cost.layer_time(w, dev, 1, 1, False) == pytest.approx(flops / 400e12)
    assert cost.layer_time(w, dev, 1, 1, True) == pytest.approx(flops * 4 / 3 / 400e12)
    ar = allreduce(1024 * 768 * 2, 2, 1, dev.link_bw, dev.hops)
    assert cost.layer_time(w, dev, 1, 2, False) == pytest.approx(flops / 2 / 400e12 + 4 * ar)


def test_every_ranked_plan_is_predicted_to_fit_and_is_valid_for_the_model():
    """The search's own promises (tests/distributed/test_ranked_plans.py trains ranked Plans and compares the
    memory model with what a rank holds)."""
    w = Workload(B13, 64, 2048, "bf16")
    res = search(w, inv({"device": "A100-40GB", "count": 8, "replicas": 2}, {"device": "T4", "count": 4}), top=50)
    assert res.ranked
    for c in res.ranked:
        assert all(c.memory[k] <= c.capacity[k] for k in c.memory)
        assert c.plan.problems(B13, None, 64) == []
        assert B13.n_head % c.plan.tp == 0 and sum(c.plan.shares(64)) == 64


def test_mixed_replicas_take_batch_in_proportion_to_speed():
    cluster = inv({"device": "H100-SXM", "count": 8, "site": "aws", "network_gbps": 400},
                  {"device": "A100-40GB", "count": 8, "replicas": 2, "site": "aws", "network_gbps": 400})
    top = search(Workload(B13, 512, 2048, "bf16"), cluster).ranked[0]
    assert set(top.devices_used) == {"H100-SXM", "A100-40GB"}
    shares = dict(zip(top.plan.replica_devices, top.plan.batch_shares, strict=True))
    assert shares["H100-SXM"] > 2 * shares["A100-40GB"]  # 989 vs 312 TFLOP/s


def test_heterogeneous_pipeline_gives_faster_stages_more_layers():
    cluster = inv({"device": "H100-SXM", "count": 8}, {"device": "V100", "count": 8})
    ev = Evaluator(Workload(B13, 64, 2048, "bf16"), cluster, {})
    hetero = [lay for lay in layouts(ev, cluster.groups) if lay.family == "hetero-pipeline" and lay.pp == 2]
    assert hetero
    for lay in hetero:
        by_dev = dict(zip((g.device.name for g in lay.kinds[0][0]), lay.stage_layers, strict=True))
        assert by_dev["H100-SXM"] > by_dev["V100"]
    assert speed_layers(24, [3.0, 1.0]) == (18, 6)


def test_slow_far_nodes_are_left_out():
    cluster = inv({"device": "H100-SXM", "count": 8, "replicas": 2, "site": "cloud", "network_gbps": 400},
                  {"device": "V100", "count": 8, "replicas": 4, "site": "onprem"}, inter_site=1.25)
    top = search(Workload(B13, 512, 2048, "bf16"), cluster).ranked[0]
    assert top.devices_used == {"H100-SXM": 16}


def test_infeasible_input_says_what_would_fit():
    """13B on one T4: nothing helps, and the message says which changes were tried — each of them checked."""
    cluster = inv({"device": "T4", "count": 1})
    w = Workload(preset("13b"), 8, 2048, "bf16")
    res = search(w, cluster)
    assert res.ranked == [] and any("out of memory" in r for r in res.reasons)
    msg = nothing_fits(res, cluster, w)
    assert "No plan fits 40-layer d=5120 on 1× T4" in msg
    assert "None of: shorter sequences, twice the devices, twice the memory, makes it fit." in msg
    assert not search(w, inv({"device": "T4", "count": 2})).ranked  # "twice the devices" indeed does not fit


def test_infeasible_small_change_found():
    """1.3B on one T4 does not fit; the message names the smallest change, and that change does fit."""
    cluster = inv({"device": "T4", "count": 1})
    w = Workload(preset("gpt2-1.3b"), 8, 2048, "bf16")
    assert not search(w, cluster).ranked
    msg = nothing_fits(search(w, cluster), cluster, w)
    assert "Smallest change that fits: double every node group" in msg
    assert search(w, inv({"device": "T4", "count": 2})).ranked  # the named change makes it fit


def test_profile_round_trip_and_use(tmp_path):
    prof = DeviceProfile(((64, 2e9), (512, 4e9)), 1.5e9, 4e-5, 0.0, 0.9, 3e8, 8e9)
    save_profile(tmp_path / "p.json", {"cpu": prof}, {"reference_s": 0.012})
    loaded = load_profile(tmp_path / "p.json")
    assert loaded == {"cpu": prof}
    assert load_measured(tmp_path / "p.json")["reference_s"] == 0.012
    dev = device_models(loaded)["cpu"]
    assert dev.flops("fp32", 64) == 2e9 and dev.flops("fp32", 288) == pytest.approx(3e9)
    assert dev.flops("fp32", 10_000) == 4e9 and dev.link_bw == 1.5e9 and dev.device.memory_bytes == 8e9
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a distgpt hardware profile"):
        load_profile(tmp_path / "bad.json")


def test_inventory_from_ray_cluster_yaml_and_errors(tmp_path):
    cluster = load_inventory(REPO / "cluster" / "aws.yaml")  # the head (slots 0) is no training capacity
    assert cluster.by_type() == {"H100-SXM": 16, "A100-40GB": 16, "L4": 16}
    assert load_inventory(REPO / "cluster" / "inventory-hetero.toml").by_type() == {"H100-SXM": 16, "V100": 32}
    (tmp_path / "bad.toml").write_text('[[nodes]]\ndevice = "Z80"\ncount = 1\n')
    with pytest.raises(InventoryError, match="unknown device type 'Z80'"):
        load_inventory(tmp_path / "bad.toml")


def test_plan_command_json_save_and_exit_codes(tmp_path, capsys):
    args = ["plan", str(REPO / "jobs" / "tiny.toml"), "--inventory", str(REPO / "cluster" / "inventory-hetero.toml")]
    assert main([*args, "--json", "--save", str(tmp_path / "plan.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plans"] and out["plans"][0]["tokens_per_s"] > 0
    saved = Plan.from_json((tmp_path / "plan.json").read_text())
    assert saved.describe() == out["plans"][0]["describe"]
    assert main([*args, "--model.preset=13b", "--data.seq_len=2048", "--max-price-per-hour=1"]) == 3
    assert "No plan fits" in capsys.readouterr().out
    assert main(["plan", str(REPO / "jobs" / "tiny.toml"), "--inventory", str(tmp_path / "none.toml")]) == 2


def test_measured_engine_costs_enter_time_and_memory():
    cpu = CATALOG["cpu"]
    base = DeviceModel(cpu, achieved_flops=1e10, intra_bw=1e9, comm_overlap=0.0)
    costly = DeviceModel(cpu, achieved_flops=1e10, intra_bw=1e9, comm_overlap=0.0,
                         engine_time=(("fsdp", 0.01),), engine_memory=(("fsdp", 5e7),))
    w = Workload(preset("tiny", n_layer=4), 8, 64, "fp32")
    cluster = inv({"device": "cpu", "count": 2})
    plan = Plan(dp=2, dp_engine="fsdp", micro_batch_size=2)
    a, b = predict(plan, w, cluster, {"cpu": base}), predict(plan, w, cluster, {"cpu": costly})
    assert b.step_time - a.step_time == pytest.approx(0.01 * 4 * 2)  # per layer × 4 layers × 2 micro-batches
    assert b.memory["cpu"] - a.memory["cpu"] == pytest.approx(5e7)
    stepwise = DeviceModel(cpu, achieved_flops=1e10, intra_bw=1e9, comm_overlap=0.0, engine_step_time=(("fsdp", 0.02),))
    c = predict(plan, w, cluster, {"cpu": stepwise})
    assert c.step_time - a.step_time == pytest.approx(0.02 * 4)  # per layer × 4 layers, once per step
    assert c.breakdown["per_step_overhead"] == pytest.approx(0.08)
    assert cost.engine_keys("deepspeed", 3, 2, 1, 1) == ["zero3"]
    assert cost.engine_keys("ddp", 0, 2, 2, 2) == ["ddp", "tp", "pp"]
    assert Plan(dp=2, micro_batch_size=2).num_micro_batches(8) == [2, 2]


def test_explanation_says_when_the_vocabulary_keeps_tensor_parallelism_out():
    cluster = inv({"device": "A100-40GB", "count": 8, "replicas": 2})
    w = Workload(B13, 64, 2048, "bf16")  # GPT-2's 50,257 tokens: no tp degree divides them
    top = search(w, cluster).ranked
    assert all(c.plan.tp == 1 for c in top)
    text = explain(top[0], cluster, w, top[1:])
    assert "tp=2/4/8 not considered: vocab_size 50257" in text and "model.vocab_size = 50304" in text
    padded = replace(w, model=replace(B13, vocab_size=50304))
    res = search(padded, cluster)
    assert "not considered" not in explain(res.ranked[0], cluster, padded, res.ranked[1:])


def test_stage_params_keep_layernorms_and_output_biases_whole_under_tp():
    """A TP rank holds 1/t of the matrices, the QKV / MLP-up biases and the embedding, and all of each LayerNorm and
    of the attention-out and MLP-down biases (row-parallel layers add them after the all-reduce)."""
    c, v = GPT2.n_embd, GPT2.vocab_size
    whole = 2 * (c + c) + 2 * c
    expect = 12 * ((layer_params(GPT2) - whole) / 2 + whole) + v * c / 2 + GPT2.block_size * c + 2 * c
    assert cost.stage_params(GPT2, 12, True, True, 2, 1) == expect
