"""``distgpt checkpoint ls`` and ``distgpt checkpoint export``: inspect checkpoints, consolidate one for inference."""

from __future__ import annotations

import json
import time

import torch.distributed.checkpoint as dcp

from distgpt import storage
from distgpt.checkpoint.export import save_model_dir
from distgpt.checkpoint.manager import MANIFEST, CheckpointError, CheckpointManager, Committed
from distgpt.checkpoint.storage import ArrowReader, list_dir
from distgpt.data.tokenizer import tokenizer_from_json
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT


def ls(root: str) -> list[dict]:
    """Every step directory under ``root``: step, bytes, status (committed / partial), plan, save time."""
    rows = []
    for info in list_dir(root):
        if not info.base_name.startswith("step-"):
            continue
        uri = storage.join(root, info.base_name)
        files = list_dir(uri)
        row = {"step": int(info.base_name[5:]), "bytes": sum(f.size or 0 for f in files), "status": "partial",
               "plan": "", "saved": ""}
        if any(f.base_name == MANIFEST for f in files):
            m = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
            row.update(status="committed", plan=m.get("plan_describe", ""),
                       saved=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["saved_unix"])))
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def export(root: str, out: str, step: int | None = None) -> int:
    """Consolidate a (verified) sharded checkpoint into one safetensors model directory; returns its step."""
    mgr = CheckpointManager(root)
    done = [c for c in mgr.committed() if step is None or c.step == step]
    if not done:
        raise CheckpointError(f"no committed checkpoint{f' at step {step}' if step is not None else ''} under "
                              f"{storage.redact(root)} — see `distgpt checkpoint ls`")
    c: Committed = done[-1]
    manifest = mgr.verify(c)
    cfg = GPTConfig.from_dict(manifest["model"])
    model = GPT(cfg)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=ArrowReader(c.uri), no_dist=True)  # one process reads every shard it needs
    model.load_state_dict(state["model"])
    tok = tokenizer_from_json(storage.read_bytes(storage.join(c.uri, "tokenizer.json")).decode())
    save_model_dir(out, model, cfg, tok, {"step": c.step, "plan": manifest.get("plan"), "source": storage.redact(root)})
    return c.step
