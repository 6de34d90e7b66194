"""``distgpt bench hardware``: measure this machine's workers and write a planner profile.

All ranks measure at once (as they train at once, sharing cores, memory bandwidth and links):
  * per-layer forward+backward time of the job's transformer block at micro-batches 1, 2, 4, 8 → achieved FLOP/s;
  * activation bytes autograd saves for one layer (``saved_tensors_hooks``) vs the Korthikanti formula → act_scale;
  * all-reduce time at a few sizes → bandwidth and per-hop latency (least squares on the ring-cost model);
  * resident memory of an initialised worker before any model exists → runtime overhead.
Run: ``distgpt bench hardware JOB --out profile.json`` (launches itself under torchrun with --nproc ranks).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

MICRO = (1, 2, 4, 8)


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_curve(cfg, seq: int) -> tuple[list[list[float]], float]:
    """[(tokens, FLOP/s)] for one block, and measured/modelled activation bytes at micro-batch 1."""
    from distgpt.model.gpt import Block
    from distgpt.model.presets import layer_params
    from distgpt.planner.cost import Workload, layer_activation_bytes

    block = Block(cfg)
    curve = []
    for b in MICRO:
        x = torch.randn(b, seq, cfg.n_embd, requires_grad=True)

        def step(x=x):
            block(x).sum().backward()

        t = _time(step)
        curve.append([b * seq, b * seq * (6 * layer_params(cfg) + 12 * cfg.n_embd * seq) / t])
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}  # counted with the model states

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(1, seq, cfg.n_embd, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    del y
    model = layer_activation_bytes(Workload(cfg, 1, seq, "fp32"), 1, 1, False, flash=True)  # SDPA's CPU kernel
    return curve, sum(saved.values()) / model


def speed_reference(repeats: int = 7) -> float:
    """Seconds for one forward+backward of one fixed transformer block (width 256, 2×128 tokens, one thread, like
    each torchrun rank): a yardstick of how fast this machine is *right now*. Shared or throttled machines drift by
    tens of percent between minutes; a profile records it, and `bench plan-accuracy` measures it again beside each
    run."""
    import dataclasses

    from distgpt.model.gpt import Block
    from distgpt.model.presets import preset

    cfg = dataclasses.replace(preset("tiny"), n_embd=256, n_head=4, block_size=128, dropout=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        block = Block(cfg)
        x = torch.randn(2, 128, cfg.n_embd, requires_grad=True)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            block(x).sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def allreduce_fit() -> tuple[float, float]:
    """(bandwidth bytes/s, per-hop latency s) from all-reduce timings at several sizes."""
    n = dist.get_world_size()
    xs, ys = [], []
    for numel in (2**14, 2**18, 2**20, 2**22):
        buf = torch.ones(numel)
        t = _time(lambda buf=buf: dist.all_reduce(buf))
        xs.append(2 * (n - 1) / n * numel * 4)
        ys.append(t)
    # t = hops·latency + bytes/bw: least squares on (bytes, t).
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = max(my - slope * mx, 0.0)
    return 1 / slope, intercept / max(1, 2 * (n - 1))


def worker(out: str, job_path: str, overrides: list[str]) -> None:
    """One rank: measure, and on rank 0 write the profile."""
    from distgpt.config import load_job
    from distgpt.parallel.mesh import init_distributed, shutdown_distributed
    from distgpt.planner.calibrate import DeviceProfile, save_profile

    init_distributed()
    overhead = _rss()
    job = load_job(job_path, overrides)
    cfg = job.gpt_config(job.model.vocab_size or 257)
    torch.manual_seed(0)
    curve, act_scale = layer_curve(cfg, job.seq_len)
    bw, latency = allreduce_fit()
    curves = [None] * dist.get_world_size()
    dist.all_gather_object(curves, curve)
    if dist.get_rank() == 0:
        # Ranks measured side by side; the planner must expect the slowest of them.
        merged = [[curve[i][0], min(r[i][1] for r in curves)] for i in range(len(curve))]
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / dist.get_world_size()
        prof = DeviceProfile(tuple(map(tuple, merged)), bw, latency, 0.0, act_scale, overhead, mem)
        save_profile(out, {"cpu": prof}, {"ranks": dist.get_world_size(), "seq_len": job.seq_len,
                                          "n_embd": cfg.n_embd, "peak_rss": resource.getrusage(
                                              resource.RUSAGE_SELF).ru_maxrss * 1024})
        print(f"wrote {out}: layer FLOP/s {[f'{f / 1e9:.1f}G@{int(t)}tok' for t, f in merged]}, all-reduce "
              f"{bw / 1e9:.2f} GB/s + {latency * 1e6:.0f} µs/hop, act_scale {act_scale:.2f}, "
              f"overhead {overhead / 2**20:.0f} MiB/rank")
    shutdown_distributed()  # not at interpreter exit, where gloo's threads may abort the process after success


# The calibration configuration: smaller and shaped differently from what `bench plan-accuracy` evaluates, so that
# accuracy is judged on plans the profile has not seen.
CALIB = ["--train.global_batch_size=8", "--plan.micro_batch_size=2", "--data.seq_len=64",
         "--data.prepared=data/calibration", "--train.progress=false", "--train.tensorboard=false"]
MECHANISMS = {
    "ddp": ["--plan.dp=2"], "fsdp": ["--plan.dp=2", "--plan.dp_engine='fsdp'"],
    "zero1": ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=1"],
    "zero2": ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=2"],
    "zero3": ["--plan.dp=2", "--plan.dp_engine='deepspeed'", "--plan.zero_stage=3"],
    "tp": ["--plan.tp=2"], "pp": ["--plan.pp=2"],
}


def run(job: str, overrides: list[str], out: str, nproc: int) -> int:
    """Measure devices under torchrun on loopback, then each parallel mechanism's overhead (needs ≥ 2 ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "distgpt.bench.hardware", out, job, *overrides]
    rc = subprocess.run(cmd).returncode  # the ranks keep gloo on loopback themselves (init_distributed)
    if rc == 0 and nproc >= 2:
        calibrate_mechanisms(out, job, overrides)
    return rc


def calibrate_mechanisms(out: str, job_path: str, overrides: list[str], steps: int = 16) -> None:
    """Run each mechanism at the calibration config, at two micro-batch sizes; store in the profile what the
    formulas miss: seconds per micro-batch and per optimizer step (per local layer), and extra memory."""
    import dataclasses
    import tempfile

    from distgpt.planner.calibrate import device_models, load_profile, save_profile

    prof = load_profile(out)["cpu"]
    devices = device_models({"cpu": prof})
    per_micro, per_step, mems = [], [], []
    reference = speed_reference()
    with tempfile.TemporaryDirectory() as tmp:
        for key, extra in MECHANISMS.items():
            # two micro-batch counts separate the cost paid per micro-batch from the cost paid once per step
            points = [_mechanism_point(job_path, [*overrides, *CALIB, *extra, f"--plan.micro_batch_size={mb}"],
                                       devices, steps, tmp) for mb in (2, 4)]
            if any(isinstance(pt, str) for pt in points):
                # a profile without this mechanism would let the planner trust the bare formulas for it
                print(f"  WARNING: calibration of {key} failed twice, so the profile has no measured cost for it "
                      f"and the planner will under-predict plans using it: "
                      f"{next(pt for pt in points if isinstance(pt, str))[-300:]}")
                continue
            (n1, e1, m1), (n2, e2, _) = points
            a = max(0.0, (e1 - e2) / (n1 - n2))
            b = max(0.0, e1 - n1 * a)
            per_micro.append((key, a))
            per_step.append((key, b))
            mems.append((key, m1))
            print(f"  {key}: {a * 1e3:+.2f} ms per micro-batch and {b * 1e3:+.2f} ms per step, per layer, beyond "
                  f"the formulas; {m1 / 2**20:+.0f} MiB")
    prof = dataclasses.replace(prof, engine_time=tuple(per_micro), engine_step_time=tuple(per_step),
                               engine_memory=tuple(mems))
    save_profile(out, {"cpu": prof}, {"calibration_config": CALIB, "reference_s": reference})


def _mechanism_point(job_path: str, args: list[str], devices: dict, steps: int, tmp: str) -> tuple | str:
    """``_mechanism_extra``, tried once more if the run fails (a two-rank run on a busy machine can)."""
    first = _mechanism_extra(job_path, args, devices, steps, tmp)
    return _mechanism_extra(job_path, args, devices, steps, tmp) if isinstance(first, str) else first


def _mechanism_extra(job_path: str, args: list[str], devices: dict, steps: int, tmp: str) -> tuple | str:
    """(micro-batches per step, measured − modelled seconds per local layer, measured − modelled peak bytes), or
    why it could not be measured."""
    from distgpt.bench.parallel_bench import launch
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.planner.cost import Workload
    from distgpt.planner.evaluate import predict
    from distgpt.planner.inventory import inventory_from_dict

    job = load_job(job_path, args)
    vocab = ensure_prepared(job, progress=lambda s: None)["tokenizer"]["vocab_size"]
    w = Workload(job.gpt_config(vocab), job.train.global_batch_size, job.seq_len, "fp32")
    plan = job.plan
    pred = predict(plan, w, inventory_from_dict({"nodes": [{"device": "cpu", "count": 2}]}), devices)
    got = launch(2, job_path, args, steps, False, tmp)
    if "error" in got or isinstance(pred, str):
        return str(got.get("error") or pred)
    measured = w.global_batch * w.seq_len / got["tokens_per_s"]
    n_micro = plan.shares(w.global_batch)[0] // plan.micro_batch_size
    layers = w.model.n_layer / plan.pp
    print(f"    {' '.join(args[-2:])}: measured {measured * 1e3:.0f} ms/step vs modelled {pred.step_time * 1e3:.0f} ms")
    return n_micro, (measured - pred.step_time) / layers, got["peak_mb"] * 2**20 - max(pred.memory.values())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("job")
    a, rest = ap.parse_known_args()
    worker(a.out, a.job, rest)
