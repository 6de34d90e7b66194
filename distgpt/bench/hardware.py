"""``distgpt bench hardware``: measure this machine's workers and write a planner profile.

On a GPU node every rank measures its GPU (in bf16, over NCCL) and the profile is keyed by the catalog's name for
that GPU (``planner.hardware.cuda_device_type``), so `distgpt plan --profile` uses it for that device type; on CPU
each rank is a core slot ("cpu"). All ranks measure at once (as they train at once, sharing cores, memory
bandwidth and links):
  * per-layer forward+backward time of the job's transformer block at micro-batches 1, 2, 4, 8 → achieved FLOP/s;
  * activation bytes autograd saves for one layer (``saved_tensors_hooks``) vs the Korthikanti formula → act_scale;
  * all-reduce time at a few sizes → bandwidth and per-hop latency (least squares on the ring-cost model);
  * memory an initialised worker holds before any model exists (CPU: resident set; GPU: device memory in use once
    NCCL's communicator exists — CUDA context, NCCL buffers) → runtime overhead.
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


def _device() -> torch.device:
    """This rank's GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, repeats: int = 5, dev: torch.device | None = None) -> float:
    dev = dev or torch.device("cpu")
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)  # GPU work is asynchronous: time it to completion
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_key(dev: torch.device) -> str:
    """The catalog device type this rank measures ('cpu' for a core slot)."""
    if dev.type != "cuda":
        return "cpu"
    from distgpt.planner.hardware import cuda_device_type

    props = torch.cuda.get_device_properties(dev)
    return cuda_device_type(props.name, props.total_memory)


def layer_curve(cfg, seq: int, dev: torch.device | None = None,
                dtype: str = "fp32") -> tuple[list[list[float]], float]:
    """[(tokens, FLOP/s)] for one block, and measured/modelled activation bytes at micro-batch 1."""
    from distgpt.model.gpt import Block
    from distgpt.model.presets import layer_params
    from distgpt.planner.cost import Workload, layer_activation_bytes

    dev = dev or torch.device("cpu")
    block = Block(cfg).to(dev)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    curve = []
    for b in MICRO:
        x = torch.randn(b, seq, cfg.n_embd, requires_grad=True, device=dev)

        def step(x=x):
            with autocast():
                y = block(x)
            y.float().sum().backward()

        t = _time(step, dev=dev)
        curve.append([b * seq, b * seq * (6 * layer_params(cfg) + 12 * cfg.n_embd * seq) / t])
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}  # counted with the model states

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(1, seq, cfg.n_embd, requires_grad=True, device=dev)
    with autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    del y
    model = layer_activation_bytes(Workload(cfg, 1, seq, dtype), 1, 1, False, flash=True)  # SDPA's flash kernel
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


def allreduce_fit(dev: torch.device | None = None) -> tuple[float, float]:
    """(bandwidth bytes/s, per-hop latency s) from all-reduce timings at several sizes."""
    n = dist.get_world_size()
    xs, ys = [], []
    big = (2**24, 2**26) if dev is not None and dev.type == "cuda" else ()  # NVLink needs large messages to fill
    for numel in (2**14, 2**18, 2**20, 2**22, *big):
        buf = torch.ones(numel, device=dev)
        t = _time(lambda buf=buf: dist.all_reduce(buf), dev=dev)
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

    dev = _device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    key = profile_key(dev)  # an uncatalogued GPU is named before anything is measured
    init_distributed()
    overhead = _rss()
    job = load_job(job_path, overrides)
    cfg = job.gpt_config(job.model.vocab_size or 257)
    torch.manual_seed(0)
    bw, latency = allreduce_fit(dev)  # first: NCCL's communicator and buffers exist from here on
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        overhead, mem = total - free - torch.cuda.memory_allocated(dev), float(total)
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / dist.get_world_size()
    curve, act_scale = layer_curve(cfg, job.seq_len, dev, "bf16" if dev.type == "cuda" else "fp32")
    curves = [None] * dist.get_world_size()
    dist.all_gather_object(curves, curve)
    if dist.get_rank() == 0:
        # Ranks measured side by side; the planner must expect the slowest of them.
        merged = [[curve[i][0], min(r[i][1] for r in curves)] for i in range(len(curve))]
        prof = DeviceProfile(tuple(map(tuple, merged)), bw, latency, 0.0, act_scale, overhead, mem)
        save_profile(out, {key: prof}, {"ranks": dist.get_world_size(), "seq_len": job.seq_len,
                                          "n_embd": cfg.n_embd, "peak_rss": resource.getrusage(
                                              resource.RUSAGE_SELF).ru_maxrss * 1024})
        flops = [f"{f / 1e9:.1f}G@{int(t)}tok" for t, f in merged]
        print(f"wrote {out} ({key}): layer FLOP/s {flops}, all-reduce {bw / 1e9:.2f} GB/s + "
              f"{latency * 1e6:.0f} µs/hop, act_scale {act_scale:.2f}, overhead {overhead / 2**20:.0f} MiB/rank")
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
    """Measure devices under torchrun on loopback, then each parallel mechanism's overhead (needs ≥ 2 ranks).
    ``nproc`` 0: one rank per GPU, else per core."""
    nproc = nproc or torch.cuda.device_count() or os.cpu_count() or 1
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

    (dev_key, prof), = load_profile(out).items()  # the one device type this machine has
    devices = device_models({dev_key: prof})
    gpu = dev_key != "cpu"
    calib = [*CALIB, *(["--plan.dtype='bf16'"] if gpu else [])]
    per_micro, per_step, mems = [], [], []
    reference = speed_reference()
    with tempfile.TemporaryDirectory() as tmp:
        for key, extra in MECHANISMS.items():
            # two micro-batch counts separate the cost paid per micro-batch from the cost paid once per step
            points = [_mechanism_point(job_path, [*overrides, *calib, *extra, f"--plan.micro_batch_size={mb}"],
                                       devices, steps, tmp, dev_key) for mb in (2, 4)]
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
    save_profile(out, {dev_key: prof}, {"calibration_config": calib, "reference_s": reference})


def _mechanism_point(job_path: str, args: list[str], devices: dict, steps: int, tmp: str,
                     key: str = "cpu") -> tuple | str:
    """``_mechanism_extra``, tried once more if the run fails (a two-rank run on a busy machine can)."""
    first = _mechanism_extra(job_path, args, devices, steps, tmp, key)
    return _mechanism_extra(job_path, args, devices, steps, tmp, key) if isinstance(first, str) else first


def _mechanism_extra(job_path: str, args: list[str], devices: dict, steps: int, tmp: str,
                     key: str = "cpu") -> tuple | str:
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
    w = Workload(job.gpt_config(vocab), job.train.global_batch_size, job.seq_len, job.plan.dtype)
    plan = job.plan
    pred = predict(plan, w, inventory_from_dict({"nodes": [{"device": key, "count": 2}]}), devices)
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
