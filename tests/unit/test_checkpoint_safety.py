"""Loading a checkpoint runs no code from it: the index is JSON distgpt parses itself, a pickled index (an earlier
distgpt's, or a planted one) is refused unless trusted, a pickled byte item is never unpickled, and a tampered index
is one clear error."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from distgpt.checkpoint import metadata_json
from distgpt.checkpoint.dcp_io import ArrowReader, PickledMetadataError
from distgpt.checkpoint.export import read_checkpoint_model
from distgpt.checkpoint.manager import CheckpointError, CheckpointManager
from distgpt.data.tokenizer import ByteTokenizer
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


class _Engine:
    """The two methods a checkpoint save asks of an engine."""

    def __init__(self, model: dict, optim: dict | None = None):
        self.model, self.optim = model, optim or {}

    def state_dicts(self) -> tuple[dict, dict]:
        return self.model, self.optim


class _Payload:
    """A pickle that runs a command when loaded: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save(root: Path, model: dict, optim: dict | None = None) -> Path:
    mgr = CheckpointManager(str(root))
    mgr.save(1, _Engine(model, optim), {"model": CFG.to_dict()}, ByteTokenizer().to_json())
    return Path(mgr.uri(1))


def _replace(step: Path, name: str, data: bytes, drop: str = "") -> None:
    """Write ``name`` and fix the manifest's checksum for it, as someone with write access to the bucket can."""
    (step / name).write_bytes(data)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"].pop(drop, None)
    if drop:
        (step / drop).unlink()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_the_index_is_json_and_round_trips(tmp_path):
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # unlike any freshly built model's, so a load that did nothing fails below
    step = _save(tmp_path / "ck", model.state_dict())
    assert (step / metadata_json.FILE).exists() and not (step / ".metadata").exists()
    json.loads((step / metadata_json.FILE).read_text())  # data, not a pickle
    loaded, _, _ = read_checkpoint_model(str(tmp_path / "ck"))
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)


def test_a_planted_pickled_index_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload does run when unpickled …
    assert marker.exists()
    marker.unlink()
    step = _save(tmp_path / "ck", GPT(CFG).state_dict())
    _replace(step, ".metadata", payload, drop=metadata_json.FILE)
    with pytest.raises(CheckpointError, match=r"index is a pickle.*--trust-pickled-metadata"):
        read_checkpoint_model(str(tmp_path / "ck"))
    with pytest.raises(PickledMetadataError):
        ArrowReader(str(step)).read_metadata()
    assert not marker.exists()  # … and loading did not unpickle it
    with pytest.warns(UserWarning, match="unpickling the index"), pytest.raises(CheckpointError):
        read_checkpoint_model(str(tmp_path / "ck"), trust_pickled=True)  # trusted: unpickled (so only if trusted)
    assert marker.exists()


def test_a_pickled_byte_item_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    step = _save(tmp_path / "ck", {"w": torch.ones(3)}, {"evil": _Payload(marker)})  # DCP stores it as bytes
    assert not marker.exists()
    index = json.loads((step / metadata_json.FILE).read_text())
    assert index["entries"]["optim.evil"] == {"kind": "bytes"}
    with pytest.raises(CheckpointError, match="item optim.evil is a pickled object, not plain data: refused"):
        CheckpointManager(str(tmp_path / "ck")).read_into(
            CheckpointManager(str(tmp_path / "ck")).committed()[0], {"model": {"w": torch.zeros(3)},
                                                                    "optim": {"evil": None}})
    assert not marker.exists()


@pytest.mark.parametrize(("index", "problem"), [
    (b"\x80\x04garbage", "not JSON"),
    (b'{"format": "other"}', "not a distgpt-dcp-metadata/1 index"),
    (None, "unknown dtype 'object'"),
    (None, "not a shard file of this checkpoint"),
])
def test_a_tampered_index_is_one_clear_error(tmp_path, index, problem):
    step = _save(tmp_path / "ck", {"w": torch.ones(3)})
    doc = json.loads((step / metadata_json.FILE).read_text())
    if "dtype" in problem:
        doc["entries"]["model.w"]["dtype"] = "object"
    if "shard file" in problem:
        doc["storage"][0]["file"] = "../../etc/passwd"
    _replace(step, metadata_json.FILE, index if index is not None else json.dumps(doc).encode())
    mgr = CheckpointManager(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match=f"{metadata_json.FILE} is unreadable: .*{problem}"):
        mgr.read_into(mgr.committed()[0], {"model": {"w": torch.zeros(3)}, "optim": {}})


def test_a_signed_manifest_detects_tampering_and_needs_the_key(tmp_path, monkeypatch):
    from distgpt.checkpoint import signing

    monkeypatch.setenv(signing.ENV, "a key only the user holds")
    step = _save(tmp_path / "ck", {"w": torch.ones(3)})
    mgr = CheckpointManager(str(tmp_path / "ck"))
    state = {"model": {"w": torch.zeros(3)}, "optim": {}}
    mgr.read_into(mgr.committed()[0], state)
    assert torch.equal(state["model"]["w"], torch.ones(3))  # signed and checked: loads
    shard = next(step.glob("__*.distcp"))
    _replace(step, shard.name, shard.read_bytes()[::-1])  # a rewritten shard with a matching checksum
    with pytest.raises(CheckpointError, match="does not match its signature"):
        mgr.read_into(mgr.committed()[0], state)
    monkeypatch.delenv(signing.ENV)
    unsigned = _save(tmp_path / "plain", {"w": torch.ones(3)})
    assert signing.FIELD not in json.loads((unsigned / "manifest.json").read_text())
    monkeypatch.setenv(signing.ENV, "a key only the user holds")
    with pytest.raises(CheckpointError, match="is not signed"):
        CheckpointManager(str(tmp_path / "plain")).verify(CheckpointManager(str(tmp_path / "plain")).committed()[0])
