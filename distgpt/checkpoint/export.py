"""A consolidated model directory: ``model.safetensors`` + ``config.json`` + ``tokenizer.json``.

The format for inference and fine-tuning (``distgpt generate``, ``distgpt checkpoint export``). Tensors go through
safetensors, never pickle. A tied LM head is stored once (as the embedding) and re-tied on load.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from distgpt import storage
from distgpt.data.tokenizer import Tokenizer, tokenizer_from_json
from distgpt.errors import DistgptError
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT
from distgpt.parallel.naming import drop_tied_head

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class ModelDirError(DistgptError, ValueError):
    """A model directory is missing or damaged; the message names the file."""


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's persistent state with a tied head dropped (it is the embedding)."""
    sd = drop_tied_head(model.state_dict(), model.cfg.tie_embeddings)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model_dir(uri: str, model: GPT | dict[str, torch.Tensor], cfg: GPTConfig, tokenizer: Tokenizer,
                   extra: dict[str, Any] | None = None) -> None:
    """Write the model (a GPT or its full tensors), its config (+ ``extra`` metadata such as the step) and the
    tokenizer to ``uri``. The config is written last: a directory without config.json is not a model.
    """
    tensors = model_tensors(model) if isinstance(model, GPT) else model
    storage.write_bytes(storage.join(uri, MODEL_FILE), st_save({k: v.contiguous() for k, v in tensors.items()}))
    storage.write_bytes(storage.join(uri, TOKENIZER_FILE), tokenizer.to_json().encode())
    meta = {"format": "distgpt-model/1", "model": cfg.to_dict(), **(extra or {})}
    storage.write_bytes(storage.join(uri, CONFIG_FILE), json.dumps(meta, indent=2).encode())


def load_model_dir(uri: str, device: str = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, config metadata) from a directory written by ``save_model_dir``."""
    try:
        raw = storage.read_bytes(storage.join(uri, CONFIG_FILE))
    except storage.StorageError:
        raise ModelDirError(
            f"{storage.redact(uri)} is not a model directory (no {CONFIG_FILE}) — point --checkpoint at a "
            f"training run's final/ directory or at the output of `distgpt checkpoint export`"
        ) from None
    try:
        meta = json.loads(raw)
        cfg = GPTConfig.from_dict(meta["model"])
        model = GPT(cfg)
    except (ValueError, KeyError, TypeError) as e:  # truncated or edited: name the file, not a traceback
        raise ModelDirError(f"{storage.redact(uri)}/{CONFIG_FILE} is damaged ({type(e).__name__}: {e}) — "
                            "export the model again") from None
    try:
        tensors = st_load(storage.read_bytes(storage.join(uri, MODEL_FILE)))
    except Exception as e:
        raise ModelDirError(f"{storage.redact(uri)}/{MODEL_FILE} cannot be read: {e}") from None
    quantised: set[str] = set()
    if any(k.endswith(".weight.int8") for k in tensors):  # an int8 inference artifact (`distgpt export`)
        from distgpt.model.quant import unpack

        mode = (meta.get("inference") or {}).get("quantize", "int8")
        try:
            used = unpack(model, tensors, "w8a8" if mode == "w8a8" else "int8")
        except ValueError as e:
            raise ModelDirError(f"{storage.redact(uri)}/{MODEL_FILE}: {e}") from None
        # NAME.weight for torchao's int8 tensors; a W8A8Linear holds NAME.qweight and NAME.scale instead
        quantised = {f"{k.rsplit('.', 2)[0]}.{leaf}" for k in used for leaf in ("weight", "qweight", "scale")}
        tensors = {k: v for k, v in tensors.items() if k not in used}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in quantised and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelDirError(f"{storage.redact(uri)}: weights do not match the config (missing {missing}, "
                            f"unexpected {unexpected})")
    try:
        tok = tokenizer_from_json(storage.read_bytes(storage.join(uri, TOKENIZER_FILE)).decode())
    except Exception as e:  # missing, truncated, or not a tokenizer: the tokenizers library raises its own types
        raise ModelDirError(f"{storage.redact(uri)}/{TOKENIZER_FILE} cannot be read ({type(e).__name__}: "
                            f"{storage.redact(str(e))[:200]}) — export the model again") from None
    return model.to(device).eval(), tok, meta


def read_checkpoint_model(root: str, step: int | None = None,
                          trust_pickled: bool = False) -> tuple[GPT, Tokenizer, dict]:
    """(the whole model, its tokenizer, the manifest) of the latest (or ``step``'s) verified committed checkpoint
    under ``root``. One process reads every shard it needs (no process group involved). ``trust_pickled``: also
    load a checkpoint whose index is DCP's pickle (an earlier distgpt's)."""
    from distgpt.checkpoint.manager import CheckpointError, CheckpointManager

    mgr = CheckpointManager(root, trust_pickled=trust_pickled)
    done = [c for c in mgr.committed() if step is None or c.step == step]
    if not done:
        raise CheckpointError(f"no committed checkpoint{f' at step {step}' if step is not None else ''} under "
                              f"{storage.redact(root)} — see `distgpt checkpoint ls`")
    c = done[-1]
    manifest = mgr.verify(c)
    model = GPT(GPTConfig.from_dict(manifest["model"]))
    state = {"model": model.state_dict()}
    mgr.read_into(c, state)
    model.load_state_dict(state["model"])
    tok = tokenizer_from_json(storage.read_bytes(storage.join(c.uri, TOKENIZER_FILE)).decode())
    return model, tok, manifest


def export_checkpoint(root: str, out: str, step: int | None = None, trust_pickled: bool = False) -> int:
    """Consolidate a (verified) sharded checkpoint under ``root`` into one safetensors model directory ``out``;
    returns its step."""
    model, tok, manifest = read_checkpoint_model(root, step, trust_pickled)
    save_model_dir(out, model, model.cfg, tok, {"step": manifest["step"], "plan": manifest.get("plan"),
                                                "source": storage.redact(root)})
    return manifest["step"]
