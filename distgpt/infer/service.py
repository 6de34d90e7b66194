"""One served copy of a model, built from the options of ``distgpt serve``: the same function builds it in the
one-process server and in each Ray Serve replica, so both serve the same model under the same limits."""

from __future__ import annotations

import sys

from distgpt.infer.api import Limits
from distgpt.infer.artifact import load_runner
from distgpt.infer.batcher import Batcher
from distgpt.infer.options import InferError, ServeSpec, needs_compiler
from distgpt.infer.protocol import Service
from distgpt.infer.runner import Runner


def open_runner(model: str, engine: str | None, max_batch: int | None, device: str = "cpu"):
    """(runner, tokenizer, metadata), compiled and warmed up when the engine is compiled (progress on stderr)."""
    runner, tok, meta = load_runner(model, engine, max_batch, device)
    needs_compiler(runner.spec.engine)
    if runner.spec.engine == "compiled":
        print("compiling (the first start on a machine takes a minute or two; later starts reuse the cache) …",
              file=sys.stderr, flush=True)
        runner.warmup(runner.batch_buckets[:2], [16])
    return runner, tok, meta


def limits_for(spec: ServeSpec, runner: Runner) -> Limits:
    """The spec's limits, defaults filled from the model (a prompt must leave room for one new token)."""
    block = runner.block_size
    return Limits(min(spec.max_prompt_tokens or block - 1, block - 1), spec.max_new_tokens or block,
                  spec.concurrent(runner.spec.max_batch))


def open_service(spec: ServeSpec, replica: str = "") -> Service:
    """Load, compile, and start the batcher of one served copy (close it with ``service.batcher.close()``)."""
    if spec.problems():
        raise InferError("; ".join(spec.problems()))
    runner, tok, _ = open_runner(spec.model, spec.engine, spec.max_batch, spec.device)
    limits = limits_for(spec, runner)
    return Service(spec.model_id, tok, Batcher(runner, limits.max_concurrent), limits, replica=replica)
