"""``distgpt generate --checkpoint DIR --prompt TEXT``: stream a continuation from a saved model."""

from __future__ import annotations

import argparse

from distgpt.cli import Command
from distgpt.config_schema import ConfigError


def generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Stream a continuation of --prompt from a saved model."""
    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], "distgpt generate")
    from distgpt.checkpoint.export import load_model_dir
    from distgpt.model.generate import SamplingConfig, generate_text

    model, tok, _ = load_model_dir(args.checkpoint, args.device)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    print(args.prompt, end="", flush=True)
    for piece in generate_text(model, tok, args.prompt, cfg, stop=args.stop or ()):
        print(piece, end="", flush=True)
    print()
    return 0


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


COMMANDS = [Command(("generate",), "generate text from a saved model", generate, _arguments)]
