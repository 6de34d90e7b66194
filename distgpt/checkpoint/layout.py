"""Where things are in a checkpoint root and a model directory, and what a manifest must hold — no torch, so data
preparation and the command layer can find a model's tokenizer or list checkpoints without loading one.

    ROOT/step-00000120/…, ROOT/step-00000120/manifest.json (the commit), ROOT/step-00000120/tokenizer.json
    MODEL_DIR/config.json (written last), MODEL_DIR/model.safetensors, MODEL_DIR/tokenizer.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from distgpt import storage
from distgpt.checkpoint import signing
from distgpt.errors import DistgptError
from distgpt.storage import list_dir, redact

MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(DistgptError, RuntimeError):
    """A checkpoint cannot be loaded (missing, corrupt, or incompatible); the message says which and what to do."""


@dataclass(frozen=True)
class Committed:
    """A checkpoint whose manifest exists."""

    step: int
    uri: str


def step_uri(root: str, step: int) -> str:
    """The directory of ``step`` under a checkpoint root."""
    return storage.join(root, f"step-{step:08d}")


def committed(root: str) -> list[Committed]:
    """Checkpoints with a manifest under ``root``, oldest first (a stray directory is not one)."""
    out = []
    for info in storage.list_dir(root):
        name = info.base_name
        if name.startswith("step-") and name[5:].isdigit() and storage.exists(storage.join(root, name, MANIFEST)):
            out.append(Committed(int(name[5:]), storage.join(root, name)))
    return sorted(out, key=lambda c: c.step)


def is_model_dir(uri: str) -> bool:
    """Whether ``uri`` holds a consolidated model (``save_model_dir``'s output: a run's final/ or an export)."""
    return storage.exists(storage.join(uri, CONFIG_FILE))


def model_tokenizer_uri(uri: str) -> str:
    """The tokenizer of the model at ``uri``: a model directory, or a checkpoint root's latest commit."""
    if is_model_dir(uri):
        return storage.join(uri, TOKENIZER_FILE)
    done = committed(uri)
    if not done:
        raise storage.StorageError(f"{storage.redact(uri)} is neither a model directory (no {CONFIG_FILE}) nor a "
                                   "checkpoint root with a committed checkpoint — point init.from at a run's "
                                   "final/ directory, an export, or a checkpoint.uri")
    return storage.join(done[-1].uri, TOKENIZER_FILE)


@dataclass(frozen=True)
class Listed:
    """One step directory under a checkpoint root, as ``distgpt checkpoint ls`` shows it."""

    step: int
    bytes: int
    status: str
    """'committed' (its manifest exists), 'partial' (an unfinished save: it does not exist for loading) or 'corrupt'
    (a manifest that cannot be read: loading refuses it)."""
    plan: str = ""
    saved: float = 0.0
    """Unix time of the commit (0 for a partial one)."""


def read_manifest(uri: str) -> dict:
    """The manifest of the checkpoint at ``uri``; CheckpointError when it is truncated or not one."""
    raw = storage.read_bytes(storage.join(uri, MANIFEST))
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{redact(uri)}: {MANIFEST} is corrupt ({e}) — it cannot be loaded; delete the "
                              "directory, or load another step") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not isinstance(m.get("step"), int):
        raise CheckpointError(f"{redact(uri)}: {MANIFEST} is not a distgpt checkpoint manifest (no 'files' and "
                              "'step')")
    bad = signing.problem(m)
    if bad:
        raise CheckpointError(f"{redact(uri)}: {MANIFEST} {bad}")
    strays = [n for n in m["files"] if not isinstance(n, str) or "/" in n or "\\" in n or n.startswith("..")]
    if strays:  # every file of a checkpoint lies in its own directory: nothing is read from elsewhere
        raise CheckpointError(f"{redact(uri)}: {MANIFEST} names files outside the checkpoint ({strays[:3]})")
    return m


def list_checkpoints(root: str) -> list[Listed]:
    """Every step directory under ``root`` with its size and status, oldest first."""
    rows = []
    for info in list_dir(root):
        if not info.base_name.startswith("step-") or not info.base_name[5:].isdigit():
            continue  # a stray directory is not a checkpoint
        uri = storage.join(root, info.base_name)
        files = list_dir(uri)
        row = Listed(int(info.base_name[5:]), sum(f.size or 0 for f in files), "partial")
        if any(f.base_name == MANIFEST for f in files):
            try:
                m = read_manifest(uri)
                row = Listed(row.step, row.bytes, "committed", m.get("plan_describe", ""), m.get("saved_unix", 0.0))
            except CheckpointError:
                row = Listed(row.step, row.bytes, "corrupt")
        rows.append(row)
    return sorted(rows, key=lambda r: r.step)
