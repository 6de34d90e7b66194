"""DCP's checkpoint index as data: JSON that distgpt writes and parses itself, so loading a checkpoint unpickles
nothing.

DCP's writer pickles its ``Metadata`` to ``.metadata`` and its reader ``pickle.load``s it back: whoever can write to
the checkpoint's bucket could make every resume run their code (a planted pickle with a matching checksum in the
manifest does — the manifest sits beside the files it checks, so it detects corruption, not tampering). The index
holds only names, dtypes, shapes, offsets and lengths, so distgpt stores exactly those (``metadata.json``) and builds
the ``Metadata`` objects from parsed values. Anything unexpected — an unknown dtype, a field of the wrong type — is a
``MetadataFormatError`` naming the entry, never a guess.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

FILE = "metadata.json"
"""The index's name in a step directory (DCP's pickled one is ``.metadata``)."""
FORMAT = "distgpt-dcp-metadata/1"

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class MetadataFormatError(ValueError):
    """``metadata.json`` is not a checkpoint index this version of distgpt can read; the message names the entry."""


def dumps(md: Metadata) -> bytes:
    """The index as JSON bytes (tensor and byte entries, the planner's key paths, where each item is stored)."""
    entries = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            entries[fqn] = {"kind": "bytes"}
            continue
        if m.properties.layout != torch.strided:
            raise MetadataFormatError(f"{fqn}: layout {m.properties.layout} cannot be checkpointed (strided only)")
        entries[fqn] = {"kind": "tensor", "dtype": str(m.properties.dtype).removeprefix("torch."),
                        "size": list(m.size),
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks]}
    storage = [{"fqn": k.fqn, "offset": None if k.offset is None else list(k.offset), "index": k.index,
                "file": v.relative_path, "at": v.offset, "length": v.length,
                "transforms": list(v.transform_descriptors or [])}
               for k, v in (md.storage_data or {}).items()]
    planner = {k: list(v) for k, v in (md.planner_data or {}).items()}
    return json.dumps({"format": FORMAT, "version": md.version, "entries": entries, "planner_data": planner,
                       "storage": storage}, separators=(",", ":")).encode()


def loads(data: bytes) -> Metadata:
    """A ``Metadata`` built from ``dumps``'s output; ``MetadataFormatError`` on anything else."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataFormatError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MetadataFormatError(f"not a {FORMAT} index (format {_field(doc, 'format')!r})")
    entries = _typed(doc, "entries", dict)
    state = {fqn: _entry(fqn, e) for fqn, e in entries.items()}
    planner = {k: tuple(_path(k, v)) for k, v in _typed(doc, "planner_data", dict).items()}
    storage = dict(_storage(i, s) for i, s in enumerate(_typed(doc, "storage", list)))
    version = doc.get("version")
    return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(), version=version if isinstance(version, str) else None)


def _field(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


def _typed(doc: dict, key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise MetadataFormatError(f"'{key}' must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _ints(where: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise MetadataFormatError(f"{where}: expected a list of non-negative integers, got {value!r:.80}")
    return value


def _entry(fqn: str, e: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    if not isinstance(e, dict) or e.get("kind") not in ("tensor", "bytes"):
        raise MetadataFormatError(f"{fqn}: an entry must be {{'kind': 'tensor' | 'bytes', …}}")
    if e["kind"] == "bytes":
        return BytesStorageMetadata()
    dtype = _DTYPES.get(e.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise MetadataFormatError(f"{fqn}: unknown dtype {e.get('dtype')!r} (known: {', '.join(_DTYPES)})")
    chunks = e.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(c, list) and len(c) == 2 for c in chunks):
        raise MetadataFormatError(f"{fqn}: 'chunks' must be a list of [offsets, sizes]")
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype), size=torch.Size(_ints(f"{fqn} size", e.get("size"))),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(_ints(f"{fqn} chunk offsets", o)),
                                     sizes=torch.Size(_ints(f"{fqn} chunk sizes", s))) for o, s in chunks])


def _path(key: str, value: Any) -> list[str | int]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise MetadataFormatError(f"planner_data[{key!r}] must be a list of keys")
    return value


def _storage(i: int, s: Any) -> tuple[MetadataIndex, _StorageInfo]:
    if not isinstance(s, dict) or not isinstance(s.get("fqn"), str) or not isinstance(s.get("file"), str):
        raise MetadataFormatError(f"storage[{i}] must name its 'fqn' and 'file'")
    if "/" in s["file"] or s["file"].startswith("."):  # an item lives in a shard file of this directory
        raise MetadataFormatError(f"storage[{i}]: file {s['file']!r} is not a shard file of this checkpoint")
    offset = None if s.get("offset") is None else torch.Size(_ints(f"storage[{i}] offset", s["offset"]))
    index = s.get("index")
    if index is not None and not isinstance(index, int):
        raise MetadataFormatError(f"storage[{i}]: 'index' must be an integer")
    at, length = _ints(f"storage[{i}] at/length", [s.get("at"), s.get("length")])
    transforms = s.get("transforms") or []
    if not isinstance(transforms, list) or not all(isinstance(t, str) for t in transforms):
        raise MetadataFormatError(f"storage[{i}]: 'transforms' must be a list of strings")
    return (MetadataIndex(fqn=s["fqn"], offset=offset, index=index),
            _StorageInfo(s["file"], at, length, transform_descriptors=transforms))
