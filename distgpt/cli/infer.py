"""``distgpt export``, ``distgpt serve`` and ``distgpt chat``: the model compiled, served and talked to."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import warnings

from distgpt.cli import Command
from distgpt.config_schema import ConfigError
from distgpt.infer.options import InferError, ServeSpec, needs_compiler
from distgpt.redact import redact

__all__ = ["COMMANDS", "InferError", "InferWarning"]


class InferWarning(UserWarning):
    """Something works but may not be what was meant."""


def _no_overrides(overrides: list[str], command: str) -> None:
    if overrides:
        raise ConfigError([f"unexpected arguments: {' '.join(overrides)}"], f"distgpt {command}")


def export(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write an inference artifact (optionally compiled-and-checked, optionally int8)."""
    _no_overrides(overrides, "export")
    from distgpt.infer.artifact import export_artifact
    from distgpt.infer.runner import EngineSpec

    spec = EngineSpec("compiled" if args.optimize else "eager", args.max_batch, args.autotune, args.quantize)
    needs_compiler(spec.engine)
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


def serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve the model over an OpenAI-compatible HTTP API (one process, or replicas on Ray Serve with ``--ray``)."""
    _no_overrides(overrides, "serve")
    spec = ServeSpec(args.model, args.engine, args.device, args.max_batch, args.max_prompt_tokens,
                     args.max_new_tokens, args.max_concurrent, args.name or "")
    bad = spec.problems()
    if not 0 <= args.port <= 65535:
        bad.append(f"--port must be 0..65535, got {args.port}")
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        bad.append(f"--host {args.host!r} is not an IP address (use 127.0.0.1, or 0.0.0.0 for all interfaces)")
        public = False
    from distgpt.cli.serve_ray import ray_only_flags

    if not args.ray and ray_only_flags(args):
        bad.append(f"{', '.join(ray_only_flags(args))} only apply with --ray (serving on Ray Serve)")
    if bad:
        raise InferError("; ".join(bad))
    if public:
        warnings.warn(f"serving on {args.host}: anyone who can reach this address can use the model "
                      "(there is no authentication)", InferWarning, stacklevel=1)
    if args.ray:
        from distgpt.cli.serve_ray import serve_on_ray

        return serve_on_ray(args, spec)
    return _serve_here(args, spec)


def _serve_here(args: argparse.Namespace, spec: ServeSpec) -> int:
    from distgpt.infer.server import serve_forever
    from distgpt.infer.service import open_service

    svc = open_service(spec)
    runner = svc.batcher.runner

    def announce(url: str) -> None:
        print(f"serving {svc.name} on {url} ({runner.spec.engine}, {runner.spec.max_batch} slots) — OpenAI API: "
              f"/v1/completions /v1/chat/completions /v1/models /health; chat: distgpt chat --server {url}",
              flush=True)

    try:
        serve_forever(svc, args.host, args.port, announce)
    except OSError as e:
        raise InferError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    finally:
        svc.batcher.close()
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
    from distgpt.infer.service import open_runner

    runner, tok, _ = open_runner(args.model, args.engine, 1, args.device)
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
    p.add_argument("--quantize", choices=("none", "int8", "w8a8"), default="none",
                   help="int8: weight-only int8 (torchao); w8a8: int8 weights and activations (CPU; fastest there)")
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
    from distgpt.cli.serve_ray import add_arguments

    add_arguments(p)


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
