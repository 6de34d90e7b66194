"""``distgpt export``, ``distgpt serve`` and ``distgpt chat``: the model compiled, served and talked to."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import warnings

from distgpt.cli import Command
from distgpt.config_schema import ConfigError
from distgpt.errors import DistgptError
from distgpt.redact import redact


class InferError(DistgptError):
    """A model cannot be prepared for inference (no compiler, bad option); the message says what to do."""


class InferWarning(UserWarning):
    """Something works but may not be what was meant."""


def _no_overrides(overrides: list[str], command: str) -> None:
    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], f"distgpt {command}")


def _needs_compiler(engine: str) -> None:
    """torch.compile on CPU builds C++; without a compiler say so once instead of a deep traceback."""
    if engine != "compiled":
        return
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise InferError("the compiled engine needs a C++ compiler on this machine (torch.compile builds C++ "
                         "kernels on CPU) — install g++ or use --engine eager")


def export(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write an inference artifact (optionally compiled-and-checked, optionally int8)."""
    _no_overrides(overrides, "export")
    from distgpt.infer.artifact import export_artifact
    from distgpt.infer.runner import EngineSpec

    spec = EngineSpec("compiled" if args.optimize else "eager", args.max_batch, args.autotune, args.quantize)
    _needs_compiler(spec.engine)
    if spec.engine == "compiled":
        print("compiling prefill and decode to check the artifact (a minute or two on CPU) …", file=sys.stderr)
    r = export_artifact(args.checkpoint, args.out, spec)
    notes = [f"{r.bytes / 2**20:.1f} MiB of weights", spec.quantize if spec.quantize != "none" else "fp32"]
    if r.compile_s is not None:
        notes.append(f"compiled in {r.compile_s:.0f} s")
    if r.matches_eager is not None:
        notes.append("compiled greedy tokens " + ("match eager" if r.matches_eager else "DIFFER from eager"))
    if r.agreement is not None:
        notes.append(f"greedy agreement with fp32 {100 * r.agreement:.1f}%")
    print(f"wrote {redact(args.out)} ({', '.join(notes)}) — try: distgpt serve {redact(args.out)}")
    return 0 if r.matches_eager is not False else 1


def _runner(args: argparse.Namespace, max_batch: int | None):
    from distgpt.infer.artifact import load_runner

    runner, tok, meta = load_runner(args.model, args.engine, max_batch, args.device)
    _needs_compiler(runner.spec.engine)
    if runner.spec.engine == "compiled":
        print("compiling (the first start on a machine takes a minute or two; later starts reuse the cache) …",
              file=sys.stderr, flush=True)
        runner.warmup(runner.batch_buckets[:2], [16])
    return runner, tok, meta


def serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve the model over an OpenAI-compatible HTTP API."""
    _no_overrides(overrides, "serve")
    from distgpt.infer.api import Limits
    from distgpt.infer.batcher import Batcher
    from distgpt.infer.server import Service, serve_forever

    bad = [f"--{k.replace('_', '-')} must be positive, got {v}" for k, v in
           (("max_batch", args.max_batch), ("max_prompt_tokens", args.max_prompt_tokens),
            ("max_new_tokens", args.max_new_tokens), ("max_concurrent", args.max_concurrent))
           if v is not None and v < 1]
    if not 0 <= args.port <= 65535:
        bad.append(f"--port must be 0..65535, got {args.port}")
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        bad.append(f"--host {args.host!r} is not an IP address (use 127.0.0.1, or 0.0.0.0 for all interfaces)")
        public = False
    if bad:
        raise InferError("; ".join(bad))
    if public:
        warnings.warn(f"serving on {args.host}: anyone who can reach this address can use the model "
                      "(there is no authentication)", InferWarning, stacklevel=1)
    runner, tok, _ = _runner(args, args.max_batch)
    block = runner.block_size
    limits = Limits(min(args.max_prompt_tokens or block - 1, block - 1), args.max_new_tokens or block,
                    args.max_concurrent or 4 * runner.spec.max_batch)
    batcher = Batcher(runner, limits.max_concurrent)
    name = args.name or args.model.rstrip("/").rsplit("/", 1)[-1]

    def announce(url: str) -> None:
        print(f"serving {name} on {url} ({runner.spec.engine}, {runner.spec.max_batch} slots) — OpenAI API: "
              f"/v1/completions /v1/chat/completions /v1/models /health; chat: distgpt chat --server {url}",
              flush=True)

    try:
        serve_forever(Service(name, tok, batcher, limits), args.host, args.port, announce)
    except OSError as e:
        raise InferError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    finally:
        batcher.close()
    return 0


def chat(args: argparse.Namespace, overrides: list[str]) -> int:
    """Talk to a model in the terminal."""
    _no_overrides(overrides, "chat")
    from distgpt.infer.chat import HttpBackend, LocalBackend, repl

    if args.server:
        return repl(HttpBackend(args.server), temperature=args.temperature, max_tokens=args.max_tokens)
    if not args.model:
        raise InferError("give a model (a run's final/ directory, an export, a checkpoint root) or --server URL")
    from distgpt.infer.batcher import Batcher

    runner, tok, _ = _runner(args, 1)
    batcher = Batcher(runner)
    try:
        return repl(LocalBackend(batcher, tok, args.model), temperature=args.temperature,
                    max_tokens=args.max_tokens)
    finally:
        batcher.close()


def _model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("model", nargs=None if required else "?",
                   help="a run's final/ directory, a `distgpt export` artifact, or a checkpoint root")
    p.add_argument("--engine", choices=("eager", "compiled"), help="default: the artifact's, else compiled")
    p.add_argument("--device", default="cpu")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run's final/ directory, a model directory, or a checkpoint root")
    p.add_argument("--out", required=True, help="directory (or object-store URI) to write the artifact to")
    p.add_argument("--optimize", action="store_true", help="serve it compiled (checked now: compiled = eager)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="weight-only int8 (torchao)")
    p.add_argument("--max-batch", type=int, default=8, help="cache slots: requests decoded together")
    p.add_argument("--autotune", action="store_true", help="slower compile, faster decode")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="model id in the API (default: the directory's name)")
    p.add_argument("--max-batch", type=int, help="cache slots (default: the artifact's, else 8)")
    p.add_argument("--max-prompt-tokens", type=int, help="default: the model's context - 1")
    p.add_argument("--max-new-tokens", type=int, help="default: the model's context")
    p.add_argument("--max-concurrent", type=int, help="running + waiting requests (default: 4 × slots)")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, required=False)
    p.add_argument("--server", help="chat with a running `distgpt serve` at this URL instead")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=200)


COMMANDS = [
    Command(("export",), "write an inference artifact: static KV cache, compiled, optionally int8", export,
            _export_arguments),
    Command(("serve",), "serve a model over an OpenAI-compatible HTTP API with streaming", serve, _serve_arguments),
    Command(("chat",), "chat with a model in the terminal (streaming)", chat, _chat_arguments),
]
