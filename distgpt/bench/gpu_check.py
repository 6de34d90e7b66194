"""``distgpt bench gpu``: is this GPU machine ready for distgpt — one command, one table, a few minutes.

* **parity over NCCL** — DDP, FSDP2 and tensor parallelism on two of the visible GPUs train exactly like one GPU: the
  real command (``torchrun … -m distgpt.cli train jobs/tiny.toml --plan.…``), 5 steps of a 4-layer fp32 model, the
  same per-step losses within 1e-4 relative (the CPU suite's ``tests/distributed/test_parity.py``, on nccl); with one
  GPU this row says it was skipped and why;
* **MFU** of ``gpt2-124m`` and ``gpt2-350m`` in bf16 on one GPU (sequence 1,024, the GPT-2 vocabulary), eager and
  with ``plan.compile`` (each block compiled), the way the trainer reports it — 6·N + attention FLOPs per token over
  the GPU's datasheet peak — timed over steps after a warm-up (which includes the compilation) with the device
  synchronised; the issue's goal is ≥ 45% on an H100-class GPU;
* **the checkpoint stall** — training time an asynchronous save costs (GPU state staged to pinned host buffers by a
  non-blocking copy, written by a background process) against a blocking save of the same state, on the 124M model.

``--smoke`` runs the same code with tiny models on whatever device is here (gloo on a CPU): it checks the command,
not the hardware, and is what the test suite runs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TINY = str(Path(__file__).resolve().parents[2] / "jobs" / "tiny.toml")
PARITY = {"ddp dp2": ["--plan.dp=2"], "fsdp2 dp2": ["--plan.dp=2", "--plan.dp_engine='fsdp'"], "tp2": ["--plan.tp=2"]}
PARITY_COMMON = ["--train.progress=false", "--train.log_interval=1", "--train.max_steps=5", "--train.eval_batches=1",
                 "--model.n_layer=4", "--model.n_head=4", "--model.vocab_size=260", "--plan.micro_batch_size=2",
                 "--train.global_batch_size=8", "--sample.max_new_tokens=1", "--model.dropout=0.0",
                 "--cluster.launcher=local", "--checkpoint.interval=0", "--plan.dtype='fp32'"]


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str
    ok: bool | None
    """Whether the goal is met; None where there is no goal or the check did not run."""


def _losses(nproc: int, overrides: list[str], out: str) -> list[float]:
    """Per-step losses of ``distgpt train`` under torchrun with ``nproc`` ranks."""
    from distgpt.bench.parallel_bench import _port
    from distgpt.train.metrics import read_records

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_port()}", "-m", "distgpt.cli", "train", TINY, *PARITY_COMMON, *overrides,
           f"--run.out_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    return [r["loss"] for r in read_records(out) if r.get("kind") is None and "loss" in r]


def parity_rows(gpus: int, data: str, tmp: str, cases: dict[str, list[str]] = PARITY) -> list[Row]:
    """Each strategy on 2 ranks against 1 rank, same job and data."""
    if gpus < 2:
        return [Row(f"parity {name} (nccl)", f"skipped: needs 2 GPUs, {gpus} visible", None) for name in cases]
    data_arg = [f"--data.prepared={data}"]
    ref = _losses(1, data_arg, f"{tmp}/ref")
    rows = []
    for name, plan in cases.items():
        try:
            got = _losses(2, [*data_arg, *plan], f"{tmp}/{name.replace(' ', '-')}")
        except RuntimeError as e:
            rows.append(Row(f"parity {name}", f"failed: {e}", False))
            continue
        worst = max(abs(a / b - 1) for a, b in zip(got, ref, strict=True)) if len(got) == len(ref) else float("inf")
        rows.append(Row(f"parity {name}", f"{len(got)} steps, losses within {worst:.1e} of one rank", worst <= 1e-4))
    return rows


def _trainer(overrides: list[str], out: str):
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.train.trainer import Trainer

    job = load_job(TINY, [*overrides, f"--run.out_dir={out}", "--train.progress=false", "--train.tensorboard=false",
                          "--train.eval_interval=0", "--checkpoint.interval=0", "--checkpoint.resume='never'"])
    ensure_prepared(job, progress=lambda s: None)
    return job, Trainer(job, log=lambda s: None)


def mfu_row(name: str, overrides: list[str], steps: int, tmp: str, sync, goal: float):
    """(the row, the trainer — kept for the checkpoint check)."""
    from distgpt.model.presets import mfu
    from distgpt.train.metrics import peak_flops

    job, trainer = _trainer(overrides, f"{tmp}/{name.replace(' ', '-')}")
    for _ in range(3):
        trainer.train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    tps = steps * job.train.global_batch_size * trainer.seq_len / (time.perf_counter() - t0)
    peak, src = peak_flops(trainer.device, job.train.peak_tflops)
    util = mfu(tps, trainer.gpt_cfg, trainer.seq_len, peak)
    row = Row(f"MFU {name}", f"{util:.1%} ({tps:,.0f} tokens/s; peak {peak / 1e12:.3g} TFLOP/s, "
              f"{src})", util >= goal if goal else None)
    return row, trainer


def stall_row(trainer, tmp: str, sync) -> Row:
    """An asynchronous save's cost to training against a blocking save, local disk."""
    from distgpt.bench.checkpoint_bench import _meta, _timed, async_stall
    from distgpt.checkpoint.manager import CheckpointManager

    steps = []
    for _ in range(5):
        sync()
        steps.append(_timed(lambda: (trainer.train_step(), sync())))
    step = statistics.median(steps)
    lost, waited, _ = async_stall(trainer, CheckpointManager(f"{tmp}/ckpt-async", keep_last=2), 10, None, sync)
    blocking = _timed(CheckpointManager(f"{tmp}/ckpt-block", keep_last=2).save, 20, trainer.engine, _meta(trainer))
    staging = "pinned host buffers" if trainer.device.type == "cuda" else "host memory (CPU state)"
    return Row("checkpoint stall", f"async {lost * 1e3:.0f} ms lost ({lost / step:.0%} of a {step * 1e3:.0f} ms "
               f"step; waited {waited * 1e3:.0f} ms), blocking {blocking * 1e3:.0f} ms; staged to {staging}",
               lost < blocking)


def _mfu_overrides(preset: str, data: str, smoke: bool) -> list[str]:
    if smoke:  # a model this machine's CPU trains in seconds
        return ["--model.n_layer=2", "--model.n_embd=64", "--model.n_head=2", "--plan.micro_batch_size=4",
                "--train.global_batch_size=4", f"--data.prepared={data}", "--plan.dtype='fp32'"]
    return [f"--model.preset='{preset}'", "--model.vocab_size=50304", "--model.block_size=1024",
            "--data.seq_len=1024", "--data.max_bytes=4000000", f"--data.prepared={data}", "--plan.dtype='bf16'",
            "--plan.micro_batch_size=16", "--train.global_batch_size=16", "--train.device='cuda'"]


def _environment(gpus: int) -> str:
    import torch

    if not gpus:
        return f"no CUDA GPU: --smoke on CPU (gloo), torch {torch.__version__} — checks the command, not hardware"
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return f"{gpus}× {', '.join(names)} | torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}"


def _print(rows: list[Row], elapsed: float) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'check':<{width}}  {'ok':<4}  result")
    for r in rows:
        ok = {True: "yes", False: "NO", None: "—"}[r.ok]
        print(f"{r.check:<{width}}  {ok:<4}  {r.result}")
    print(f"all checks: {elapsed:.0f} s")


def _mfu_rows(smoke: bool, steps: int, tmp: str, sync, goal: float) -> tuple[list[Row], object]:
    """Each model eager and compiled; also the first (eager) trainer, for the checkpoint check."""
    rows, first = [], None
    for preset in (["tiny"] if smoke else ["gpt2-124m", "gpt2-350m"]):
        for compiled in (False, True):
            over = [*_mfu_overrides(preset, f"{tmp}/data-1024", smoke), f"--plan.compile={str(compiled).lower()}"]
            label = f"{preset} {'fp32' if smoke else 'bf16'}{' compiled' if compiled else ''}"
            row, trainer = mfu_row(label, over, steps, tmp, sync, goal)
            rows.append(row)
            first = first or trainer
            del trainer  # the next model needs the memory (the first stays referenced)
    return rows, first


def run(steps: int, smoke: bool) -> int:
    """Entry point of ``distgpt bench gpu``: 0 when every check passes, 1 when one fails, 2 without a GPU."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not Path(TINY).is_file():
        print(f"distgpt bench gpu: {TINY} is missing — run it from a distgpt checkout (it trains jobs/tiny.toml)",
              file=sys.stderr)
        return 2
    if not gpus and not smoke:
        print("distgpt bench gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False) — run it on a GPU "
              "machine; `--smoke` runs the same checks with tiny models on this machine's CPU", file=sys.stderr)
        return 2
    start, sync = time.perf_counter(), (torch.cuda.synchronize if gpus else (lambda: None))
    print(_environment(gpus), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        _trainer([f"--data.prepared={tmp}/tiny-data"], f"{tmp}/prepare")  # once, before ranks race to prepare it
        cases = {"ddp dp2": PARITY["ddp dp2"]} if smoke else PARITY
        rows = parity_rows(2 if smoke else gpus, f"{tmp}/tiny-data", tmp, cases)
        name = torch.cuda.get_device_name(0) if gpus else ""
        goal = 0.45 if ("H100" in name or "H200" in name) else 0.0  # the goal is stated for H100-class
        mfu_rows, first = _mfu_rows(smoke, steps, tmp, sync, goal)
        rows += [*mfu_rows, stall_row(first, tmp, sync)]
    _print(rows, time.perf_counter() - start)
    return 1 if any(r.ok is False and not r.check.startswith("MFU") for r in rows) else 0
