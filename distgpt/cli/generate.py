"""``distgpt generate --checkpoint DIR --prompt TEXT``: stream a continuation from a saved model."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from distgpt.cli import Command
from distgpt.config_schema import ConfigError


def generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Stream a continuation of --prompt from a saved model."""
    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], "distgpt generate")
    checks = ((args.max_new_tokens >= 1, f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}"),
              (args.temperature >= 0, f"--temperature must be ≥ 0 (0 = greedy), got {args.temperature}"),
              (args.top_k >= 0, f"--top-k must be ≥ 0 (0 = off), got {args.top_k}"),
              (0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1 = off), got {args.top_p}"))
    problems = [p for ok, p in checks if not ok]
    if problems:
        raise ConfigError(problems, "distgpt generate")
    from distgpt.model.generate import SamplingConfig

    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    pieces = _compiled(args, cfg) if args.engine == "compiled" else _eager(args, cfg)
    print(args.prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def _eager(args: argparse.Namespace, cfg) -> Iterator[str]:
    """The model as trained, op by op, with a growing KV cache (the reference)."""
    from distgpt.infer.artifact import read_model
    from distgpt.model.generate import generate_text

    model, tok, _ = read_model(args.checkpoint, args.device)
    return generate_text(model, tok, args.prompt, cfg, stop=args.stop or ())


def _compiled(args: argparse.Namespace, cfg) -> Iterator[str]:
    """The static-cache decoder through torch.compile (``distgpt export --optimize`` explains)."""
    from distgpt.infer.artifact import load_runner
    from distgpt.infer.batcher import Batcher, generate_text
    from distgpt.infer.options import needs_compiler

    needs_compiler("compiled")
    runner, tok, _ = load_runner(args.checkpoint, "compiled", 1, args.device)
    batcher = Batcher(runner)
    text = generate_text(batcher, tok, tok.encode(args.prompt)[-(runner.block_size - 1):], cfg, tuple(args.stop or ()))

    def pieces() -> Iterator[str]:
        try:
            yield from text
        finally:
            text.close()
            batcher.close()

    return pieces()


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model directory (a run's final/ or an export)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=("eager", "compiled"), default="eager",
                   help="eager: as trained; compiled: static KV cache through torch.compile (compiles first)")


COMMANDS = [Command(("generate",), "generate text from a saved model", generate, _arguments)]
