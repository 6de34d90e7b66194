"""Where things are in a checkpoint root and a model directory — names only, no torch, so data preparation and the
command layer can find a model's tokenizer without loading a checkpoint.

    ROOT/step-00000120/…, ROOT/step-00000120/manifest.json (the commit), ROOT/step-00000120/tokenizer.json
    MODEL_DIR/config.json (written last), MODEL_DIR/model.safetensors, MODEL_DIR/tokenizer.json
"""

from __future__ import annotations

from dataclasses import dataclass

from distgpt import storage

MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


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
