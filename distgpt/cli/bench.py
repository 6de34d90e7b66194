"""``distgpt bench …``: each benchmark prints what it measured beside a reference measured in the same run."""

from __future__ import annotations

import argparse

from distgpt.cli import Command


def trainer(args: argparse.Namespace, overrides: list[str]) -> int:
    """distgpt trainer vs a minimal hand-written loop on the same model and data."""
    from distgpt.bench.trainer_bench import run

    return run(args.job, overrides, args.steps, args.repeats)


def parallel(args: argparse.Namespace, overrides: list[str]) -> int:
    """Every parallel strategy vs a hand-written script of the same strategy."""
    from distgpt.bench.parallel_bench import run

    return run(args.job, overrides, args.steps, args.json, args.only, tuple(args.rounds), args.target)


def hardware(args: argparse.Namespace, overrides: list[str]) -> int:
    """Measure this machine's workers and write a planner profile."""
    from distgpt.bench.hardware import run

    return run(args.job, overrides, args.out, args.nproc)


def planner(args: argparse.Namespace, overrides: list[str]) -> int:
    """Planning time at 64 / 1,024 / 16,384 devices."""
    from distgpt.bench.planner_bench import run_planning_time

    return run_planning_time()


def accuracy(args: argparse.Namespace, overrides: list[str]) -> int:
    """Predicted vs measured step time and memory of the planner's plans on this machine, or of a table's runs."""
    if args.table is not None or args.fit:
        from distgpt.bench.table_accuracy import run as run_table

        return run_table(args.table or None, args.fit)
    if not args.profile:
        from distgpt.errors import DistgptError

        raise DistgptError("bench plan-accuracy: give --profile PROFILE.json (from `distgpt bench hardware`) to run "
                           "plans here, or --table [FILE.csv] to score a table of measured runs")
    from distgpt.bench.planner_bench import run_accuracy

    return run_accuracy(args.job, overrides, args.profile, args.steps, args.plans)


def gpu(args: argparse.Namespace, overrides: list[str]) -> int:
    """GPU readiness: nccl parity, MFU of gpt2-124m / 350m, the checkpoint stall — one table."""
    from distgpt.bench.gpu_check import run

    return run(args.steps, args.smoke)


def _gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=30, help="timed steps per MFU measurement (default 30)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models on this machine's CPU: checks the command, not the hardware")


def launcher(args: argparse.Namespace, overrides: list[str]) -> int:
    """distgpt train on the embedded Ray cluster vs in this process, end to end."""
    from distgpt.bench.launcher_bench import run

    if args.interleave:
        from distgpt.bench.launcher_interleave import run_interleaved

        return run_interleaved(args.job, overrides, args.interleave, args.windows)
    return run(args.job, overrides, args.steps, args.rounds)


def _launcher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", default="jobs/tiny.toml")
    p.add_argument("--steps", type=int, default=2000, help="steps per run (default 2000: ~2–3 minutes here)")
    p.add_argument("--rounds", type=int, default=2, help="alternated pairs (default 2: ABBA)")
    p.add_argument("--interleave", type=float, default=0.0, metavar="SECONDS",
                   help="instead: both launchers at once, taking turns every SECONDS (the per-step cost alone)")
    p.add_argument("--windows", type=int, default=24, help="--interleave: turns in all (default 24)")


def ray_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """Orchestrator: time to first step vs Ray Train, tokens/s vs torchrun, recovery time."""
    from distgpt.bench.ray_bench import run

    return run(args.job, overrides, args.world, args.steps)


def autoscale(args: argparse.Namespace, overrides: list[str]) -> int:
    """Submission vs ray job submit, scale-up time, re-plan-on-growth time, on a real autoscaler sandbox."""
    from distgpt.bench.autoscale_bench import run

    return run(args.job, overrides, args.repeats)


def rl_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """RL on the arithmetic task: held-out accuracy before/after; generation / learning / sync split."""
    from distgpt.bench.rl_bench import run

    return run(args.steps, args.pretrain_steps, overrides, args.json)


def _rl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=60, help="RL steps")
    p.add_argument("--pretrain-steps", type=int, default=500, help="pre-training steps of the starting model")
    p.add_argument("--json", help="also write the figures to this file")


def tune_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """A tune of ≤ N trials vs measuring every runnable plan."""
    from distgpt.bench.tune_bench import run

    return run(args.job, overrides, args.steps, args.trials, args.repeats, args.json, args.confirm)


def _tune_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/bench-parallel.toml")(p)
    p.add_argument("--steps", type=int, default=16, help="steps per trial")
    p.add_argument("--trials", type=int, default=8, help="the tune's budget")
    p.add_argument("--repeats", type=int, default=2, help="tunes after the exhaustive search")
    p.add_argument("--confirm", type=int, default=3, help="interleaved rounds re-measuring the plans compared")
    p.add_argument("--json", help="also write the figures to this file")


def _autoscale_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/tiny.toml")(p)
    p.add_argument("--repeats", type=int, default=2, help="alternated runs of each side")


def checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    """Checkpoint throughput vs raw pyarrow, and async vs blocking stall."""
    from distgpt.bench.checkpoint_bench import run

    return run(args.job, overrides, args.uri, args.repeats)


def sft(args: argparse.Namespace, overrides: list[str]) -> int:
    """Supervised fine-tuning throughput, packed rows vs one conversation per padded row."""
    from distgpt.bench.sft_bench import run

    return run(args.job, overrides, args.steps, args.repeats)


def _sft_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/sft.toml")(p)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=6, help="timed blocks per layout (alternated)")


def generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Decode speed of each inference engine, and the server under concurrent load."""
    from distgpt.bench.generate_bench import run

    return run(args)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="bench this model (default: random weights of --layers × --width)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=320, help="n_embd (heads of 64); 12 × 320 ≈ 15M parameters")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per engine run")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every engine")
    p.add_argument("--part", choices=("all", "engines", "server"), default="all")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--server-tokens", type=int, default=64, help="tokens per server request")
    p.add_argument("--server-engine", choices=("eager", "compiled"), default="compiled")
    p.add_argument("--ray-replicas", type=int, nargs="*", default=[],
                   help="also serve on Ray Serve with these replica counts (streaming only), e.g. 1 2")


def init_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """Peak host memory per rank during set-up: each rank making its part vs building the whole model."""
    from distgpt.bench.init_bench import run

    return run()


def _job(default: str):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("job", nargs="?", default=default)

    return add


def _trainer_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/demo.toml")(p)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)


def _ray_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/tiny.toml")(p)
    p.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--steps", type=int, default=40)


def _parallel_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/bench-parallel.toml")(p)
    p.add_argument("--steps", type=int, default=0, help="steps per timed block (default: about 1.5 s of steps)")
    p.add_argument("--rounds", type=int, nargs=2, default=(6, 40), metavar=("MIN", "MAX"),
                   help="paired rounds per strategy (default 6 40)")
    p.add_argument("--target", type=float, default=0.03, help="stop once the ratio's 95%% interval is this narrow")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--only", action="append", help="run strategies whose name contains this (repeatable)")


def _hardware_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/bench-parallel.toml")(p)
    p.add_argument("--out", default="profile.json")
    p.add_argument("--nproc", type=int, default=0, help="worker ranks (default: one per GPU, else per CPU core)")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/bench-checkpoint.toml")(p)
    p.add_argument("--uri", help="storage to use (default: a moto S3 server on 127.0.0.1)")
    p.add_argument("--repeats", type=int, default=3)


def _accuracy_args(p: argparse.ArgumentParser) -> None:
    _job("jobs/bench-parallel.toml")(p)
    p.add_argument("--profile", help="profile from `distgpt bench hardware` (runs the planner's plans here)")
    p.add_argument("--table", nargs="?", const="", default=None, metavar="FILE.csv",
                   help="score a table of measured runs instead (no file: the published runs distgpt ships)")
    p.add_argument("--fit", action="store_true", help="with --table: refit the layer-time figures on its 'fit' rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--plans", type=int, default=6)


COMMANDS = [
    Command(("bench", "trainer"), "trainer overhead vs a hand-written PyTorch loop", trainer, _trainer_args,
            group_help="benchmarks"),
    Command(("bench", "ray"), "orchestrator: first-step time vs Ray Train, tokens/s vs torchrun, recovery",
            ray_bench, _ray_args),
    Command(("bench", "launcher"), "distgpt train on its default launcher (Ray) vs in-process, end to end",
            launcher, _launcher_args),
    Command(("bench", "autoscale"), "distgpt submit vs ray job submit; autoscaler scale-up; re-plan on growth",
            autoscale, _autoscale_args),
    Command(("bench", "tune"), "distgpt tune (≤ 8 trials) vs measuring every runnable plan", tune_bench,
            _tune_args),
    Command(("bench", "parallel"), "each strategy vs a hand-written script of the same strategy, interleaved to ±3%%",
            parallel, _parallel_args),
    Command(("bench", "init"), "set-up memory per rank (gpt2-1.3b / 6.7b widths): meta-device init vs whole model",
            init_bench),
    Command(("bench", "hardware"), "measure this machine's workers into a planner profile", hardware,
            _hardware_args),
    Command(("bench", "checkpoint"), "checkpoint save/load vs raw pyarrow I/O; async vs blocking stall", checkpoint,
            _checkpoint_args),
    Command(("bench", "rl"), "RL on arithmetic: held-out accuracy before/after; generation / learning / sync split",
            rl_bench, _rl_args),
    Command(("bench", "sft"), "fine-tuning throughput: packed rows vs one conversation per padded row", sft,
            _sft_args),
    Command(("bench", "generate"), "inference: eager vs compiled vs int8 decode; server tokens/s and TTFT under load",
            generate, _generate_args),
    Command(("bench", "gpu"), "GPU readiness: nccl parity (DDP, FSDP2, TP), MFU of gpt2-124m/350m, checkpoint stall",
            gpu, _gpu_args),
    Command(("bench", "planner"), "planning time for 1,024 and 16,384 devices of 4 types", planner),
    Command(("bench", "plan-accuracy"), "predicted vs measured: the planner's plans run here, or a table of runs",
            accuracy,
            _accuracy_args),
]
