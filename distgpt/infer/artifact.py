"""The inference artifact (``distgpt export``) and loading any model for inference.

An artifact is a model directory — ``model.safetensors``, ``tokenizer.json``, ``config.json`` — whose config carries
an ``inference`` entry (an ``EngineSpec``: engine, cache slots, autotune, quantisation) and whose weights may be int8.
It is data only: nothing in it is executed or unpickled, so an artifact from elsewhere is as safe to load as a
tensor file. The compiled form is built from it on the machine that serves it (``infer.runner`` says why).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, fields, replace

from distgpt import storage
from distgpt.checkpoint.export import ModelDirError, load_model_dir, model_tensors, save_model_dir
from distgpt.checkpoint.layout import is_model_dir
from distgpt.data.tokenizer import Tokenizer
from distgpt.infer.runner import EngineSpec, Runner
from distgpt.model.gpt import GPT

PROBE_PROMPTS = ("\n", "The ", "And ", "What ", "I ", "O, ", "Thou ", "My lord")
"""The fixed prompt set greedy agreement is measured on (short, and common in English text)."""


def read_model(uri: str, device: str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, metadata) of a model directory, an artifact, or a checkpoint root's latest commit."""
    if check_model(uri) == "model":
        return load_model_dir(uri, device)
    from distgpt.checkpoint.export import read_checkpoint_model

    model, tok, manifest = read_checkpoint_model(uri)
    return model.to(device).eval(), tok, {"step": manifest.get("step"), "source": storage.redact(uri)}


def check_model(uri: str) -> str:
    """'model' (a model directory or artifact) or 'checkpoint' (a root with a committed checkpoint); anything else is
    a ``ModelDirError`` naming what to point at — cheap, so a launcher checks before starting replicas."""
    if is_model_dir(uri):
        return "model"
    from distgpt.checkpoint.layout import committed

    if not committed(uri):
        raise ModelDirError(f"{storage.redact(uri)} is not a model directory (no config.json) nor a checkpoint root "
                            "with a committed checkpoint — point at a run's final/ directory, a `distgpt export` "
                            "artifact, or a run's checkpoint.uri")
    return "checkpoint"


def stored_slots(uri: str) -> int:
    """The cache slots a model is served with by default (its artifact's ``max_batch``), read from config.json
    alone — without loading the weights."""
    if check_model(uri) == "checkpoint":
        return EngineSpec().max_batch
    import json

    from distgpt.checkpoint.export import CONFIG_FILE

    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)))
    except ValueError as e:
        raise ModelDirError(f"{storage.redact(uri)}/{CONFIG_FILE} is damaged ({e}) — export the model again") from None
    return spec_of(meta if isinstance(meta, dict) else {}).max_batch


def spec_of(meta: dict) -> EngineSpec:
    """The ``EngineSpec`` stored in a model's config (the default spec for a plain model directory)."""
    stored = meta.get("inference") or {}
    known = {f.name for f in fields(EngineSpec)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ModelDirError(f"config.json: unknown inference keys {unknown} (known: {sorted(known)})")
    spec = EngineSpec(**stored)
    if spec.problems():
        raise ModelDirError("config.json inference: " + "; ".join(spec.problems()))
    return spec


def load_runner(uri: str, engine: str | None = None, max_batch: int | None = None,
                device: str = "cpu") -> tuple[Runner, Tokenizer, dict]:
    """A ``Runner`` for the model at ``uri`` (its stored spec, with ``engine`` / ``max_batch`` overriding)."""
    model, tok, meta = read_model(uri, device)
    spec = spec_of(meta)
    spec = replace(spec, **{k: v for k, v in (("engine", engine), ("max_batch", max_batch)) if v is not None})
    if spec.problems():
        raise ModelDirError("; ".join(spec.problems()))
    return Runner(model, spec), tok, meta


@dataclass(frozen=True)
class ExportReport:
    """What ``export_artifact`` wrote and checked."""

    out: str
    bytes: int
    compile_s: float | None
    """Seconds to compile prefill + batch-1 decode (None: not compiled)."""
    agreement: float | None
    """Fraction of greedy tokens equal to the fp32 model's over ``PROBE_PROMPTS`` (a quantised runner against fp32)."""
    matches_eager: bool | None
    """Compiled fp32 greedy tokens equal the eager model's (None: not checked)."""


def greedy_tokens(runner: Runner, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` through ``runner`` (batch 1, slot 0)."""
    out = []
    logits = runner.prefill(0, prompt)
    pos = len(prompt)
    for _ in range(n):
        out.append(int(logits.argmax()))
        if pos >= runner.block_size:
            break
        logits = runner.decode([out[-1]], [pos])[0]
        pos += 1
    return out


def agreement(test: Runner, ref: Runner, tok: Tokenizer, n: int = 32) -> float:
    """Greedy agreement of ``test`` with ``ref`` over ``PROBE_PROMPTS``: ``ref`` writes a greedy continuation of each
    prompt, ``test`` reads the same text, and the score is the fraction of positions where ``test``'s greedy
    choice is ``ref``'s next token (teacher-forced, so one early difference does not decide every later one)."""
    same = total = 0
    for p in PROBE_PROMPTS:
        ids = tok.encode(p)[-(ref.block_size // 2):] or [0]
        want = greedy_tokens(ref, ids, min(n, ref.block_size - len(ids)))
        logits = test.prefill(0, ids)
        for i, tok_id in enumerate(want):
            same += int(logits.argmax()) == tok_id
            total += 1
            if len(ids) + i >= test.block_size:
                break
            logits = test.decode([tok_id], [len(ids) + i])[0]
    return same / max(total, 1)


def export_artifact(src: str, out: str, spec: EngineSpec, check_tokens: int = 32) -> ExportReport:
    """Write the inference artifact of the model at ``src`` to ``out``; compile and check it when the spec says
    compiled (greedy tokens equal to eager for fp32; agreement with fp32 for int8 / w8a8)."""
    if spec.problems():
        raise ModelDirError("; ".join(spec.problems()))
    model, tok, meta = read_model(src)
    fp32 = Runner(model, replace(spec, engine="eager", quantize="none", max_batch=1))
    if spec.quantize != "none":
        from distgpt.model.quant import pack, quantize_int8, quantize_w8a8

        served = (quantize_int8 if spec.quantize == "int8" else quantize_w8a8)(copy.deepcopy(model))
        tensors = pack(served)
    else:
        tensors, served = model_tensors(model), model
    extra = {"step": meta.get("step"), "source": storage.redact(src), "inference": asdict(spec)}
    save_model_dir(out, tensors, model.cfg, tok, extra)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    compile_s = matches = agree = None
    if spec.engine == "compiled" or spec.quantize != "none":
        runner = Runner(served, replace(spec, max_batch=1))
        start = time.perf_counter()
        runner.warmup([1], [len(tok.encode(PROBE_PROMPTS[0]))])
        compile_s = time.perf_counter() - start if spec.engine == "compiled" else None
        if spec.quantize != "none":
            agree = agreement(runner, fp32, tok, check_tokens)
        else:
            ids = tok.encode(PROBE_PROMPTS[1]) or [0]
            matches = greedy_tokens(runner, ids, check_tokens) == greedy_tokens(fp32, ids, check_tokens)
    return ExportReport(out, size, compile_s, agree, matches)

