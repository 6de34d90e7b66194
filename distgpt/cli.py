"""The ``distgpt`` command: thin calls into the packages. Bad input → one clear message on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from distgpt.checkpoint.export import ModelDirError
from distgpt.checkpoint.manager import CheckpointError
from distgpt.config_schema import ConfigError
from distgpt.data.loader import DatasetError
from distgpt.data.prepare import PrepareError
from distgpt.data.sources import SourceError
from distgpt.planner.inventory import InventoryError
from distgpt.storage import StorageError
from distgpt.train_cmd import cmd_train

USER_ERRORS = (ConfigError, DatasetError, PrepareError, SourceError, StorageError, ModelDirError, CheckpointError,
               InventoryError)


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job file (TOML or YAML), e.g. jobs/demo.toml")


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Tokenize and shard the job's corpus."""
    from distgpt.config import load_job
    from distgpt.data.prepare import PrepareSpec, prepare

    job = load_job(args.job, overrides)
    d = job.data
    out = args.out or job.prepared_dir
    spec = PrepareSpec(tuple(d.sources), out, d.tokenizer, d.vocab_size, job.seq_len, d.val_fraction, d.text_field,
                       d.max_bytes, d.shard_samples)
    prepare(spec)
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Stream a continuation of --prompt from a saved model."""
    from distgpt.checkpoint.export import load_model_dir
    from distgpt.model.generate import SamplingConfig, generate_text

    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], "distgpt generate")
    model, tok, _ = load_model_dir(args.checkpoint, args.device)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    print(args.prompt, end="", flush=True)
    for piece in generate_text(model, tok, args.prompt, cfg, stop=args.stop or ()):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the fully resolved job (defaults, file and overrides) as JSON."""
    from distgpt.config import load_job
    from distgpt.config_schema import to_dict

    print(json.dumps(to_dict(load_job(args.job, overrides)), indent=2))
    return 0


def cmd_bench_trainer(args: argparse.Namespace, overrides: list[str]) -> int:
    """distgpt trainer vs a minimal hand-written loop on the same model and data."""
    from distgpt.bench.trainer_bench import run

    return run(args.job, overrides, args.steps, args.repeats)


def cmd_bench_parallel(args: argparse.Namespace, overrides: list[str]) -> int:
    """Every parallel strategy vs a plain torchrun DDP script."""
    from distgpt.bench.parallel_bench import run

    return run(args.job, overrides, args.steps, args.json, args.only)


def cmd_bench_hardware(args: argparse.Namespace, overrides: list[str]) -> int:
    """Measure this machine's workers and write a planner profile."""
    from distgpt.bench.hardware import run

    return run(args.job, overrides, args.out, args.nproc)


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """Rank plans for the job on an inventory; explain the best; exit 3 when nothing fits."""
    from distgpt.planner.cli import plan_command

    return plan_command(args, overrides)


def cmd_bench_planner(args: argparse.Namespace, overrides: list[str]) -> int:
    """Planning time at 64 / 1,024 / 16,384 devices."""
    from distgpt.bench.planner_bench import run_planning_time

    return run_planning_time()


def cmd_bench_accuracy(args: argparse.Namespace, overrides: list[str]) -> int:
    """Predicted vs measured step time and memory of the planner's plans on this machine."""
    from distgpt.bench.planner_bench import run_accuracy

    return run_accuracy(args.job, overrides, args.profile, args.steps, args.plans)


def cmd_checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    """List checkpoints, or export one as a consolidated safetensors model."""
    from distgpt.checkpoint import commands

    if args.checkpoint_command == "ls":
        rows = commands.ls(args.root)
        if not rows:
            print(f"no checkpoints under {args.root}")
        for r in rows:
            print(f"step {r['step']:>8}  {r['bytes'] / 2**20:9.2f} MiB  {r['status']:9}  {r['saved']:19}  {r['plan']}")
        return 0
    step = commands.export(args.root, args.out, args.step)
    print(f"exported step {step} to {args.out} — try: distgpt generate --checkpoint {args.out} --prompt '...'")
    return 0


def cmd_bench_ray(args: argparse.Namespace, overrides: list[str]) -> int:
    """Orchestrator: time to first step vs Ray Train, tokens/s vs torchrun, recovery time."""
    from distgpt.bench.ray_bench import run

    return run(args.job, overrides, args.world, args.steps)


def cmd_bench_checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    """Checkpoint throughput vs raw pyarrow, and async vs blocking stall."""
    from distgpt.bench.checkpoint_bench import run

    return run(args.job, overrides, args.uri, args.repeats)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands take --section.key=value overrides after their arguments)."""
    parser = argparse.ArgumentParser(prog="distgpt", description="Train GPT models across many machines.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a job (prepares its data first if needed)")
    _job_args(p)
    p.add_argument("--plan", help="a Plan as JSON (replaces the job's [plan] section)")
    p.add_argument("--address", default="", help="Ray cluster to run on (default: $RAY_ADDRESS, else an embedded "
                   "local cluster); ignored under torchrun or with --cluster.launcher=local")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved job configuration")
    _job_args(p)
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize a corpus into Arrow shards + manifest")
    _job_args(p)
    p.add_argument("--out", help="where to write (default: the job's data.prepared)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate text from a saved model")
    p.add_argument("--checkpoint", required=True, help="model directory (a run's final/ or an export)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="choose a parallel plan for a job on a (heterogeneous) cluster")
    _job_args(p)
    p.add_argument("--inventory", required=True, help="inventory file (TOML/YAML) or a Ray cluster-launcher YAML")
    p.add_argument("--objective", choices=["throughput", "cost"], default="throughput")
    p.add_argument("--max-price-per-hour", type=float, help="budget: plans above it are dropped")
    p.add_argument("--min-tokens-per-s", type=float, help="plans below it are dropped")
    p.add_argument("--profile", help="hardware profile from `distgpt bench hardware` (measured figures)")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--save", help="write the best Plan as JSON (for `distgpt train --plan`)")
    p.set_defaults(func=cmd_plan)

    ck = sub.add_parser("checkpoint", help="checkpoint commands").add_subparsers(dest="checkpoint_command",
                                                                                  required=True)
    p = ck.add_parser("ls", help="list checkpoints with step, size and status")
    p.add_argument("root", help="checkpoint root (a run's checkpoint.uri)")
    p.set_defaults(func=cmd_checkpoint)
    p = ck.add_parser("export", help="write one consolidated safetensors model (+ config, tokenizer)")
    p.add_argument("root")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="default: the latest committed")
    p.set_defaults(func=cmd_checkpoint)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("trainer", help="trainer overhead vs a hand-written PyTorch loop")
    p.add_argument("job", nargs="?", default="jobs/demo.toml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench_trainer)
    p = bench.add_parser("ray", help="orchestrator: first-step time vs Ray Train, tokens/s vs torchrun, recovery")
    p.add_argument("job", nargs="?", default="jobs/tiny.toml")
    p.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--steps", type=int, default=40)
    p.set_defaults(func=cmd_bench_ray)
    p = bench.add_parser("parallel", help="tokens/s and memory per rank of each strategy vs plain torchrun DDP")
    p.add_argument("job", nargs="?", default="jobs/bench-parallel.toml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--only", action="append", help="run strategies whose name contains this (repeatable)")
    p.set_defaults(func=cmd_bench_parallel)
    p = bench.add_parser("hardware", help="measure this machine's workers into a planner profile")
    p.add_argument("job", nargs="?", default="jobs/bench-parallel.toml")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--nproc", type=int, default=os.cpu_count() or 1, help="worker ranks (default: CPU cores)")
    p.set_defaults(func=cmd_bench_hardware)
    p = bench.add_parser("checkpoint", help="checkpoint save/load vs raw pyarrow I/O; async vs blocking stall")
    p.add_argument("job", nargs="?", default="jobs/bench-checkpoint.toml")
    p.add_argument("--uri", help="storage to use (default: a moto S3 server on 127.0.0.1)")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_bench_checkpoint)
    p = bench.add_parser("planner", help="planning time for 1,024 and 16,384 devices of 4 types")
    p.set_defaults(func=cmd_bench_planner)
    p = bench.add_parser("plan-accuracy", help="run the planner's plans here; predicted vs measured")
    p.add_argument("job", nargs="?", default="jobs/bench-parallel.toml")
    p.add_argument("--profile", required=True, help="profile from `distgpt bench hardware`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--plans", type=int, default=6)
    p.set_defaults(func=cmd_bench_accuracy)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    try:
        return func(args, rest)
    except USER_ERRORS as e:
        print(f"distgpt: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a run that failed on the cluster, or no plan fits it: say why, no traceback
        if type(e).__name__ not in ("OrchestrationError", "NoPlanError"):
            raise
        print(f"distgpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
