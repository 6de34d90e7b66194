"""How a rank's items are laid out in its shard file: raw tensor bytes, one after another.

DCP's ``FileSystemWriter`` wraps every tensor in its own ``torch.save`` zip archive. For a 165 MiB state of 529
tensors that cost ≈0.35 CPU-s per save (profiled), on the cores a CPU step — or, to a local S3 server, the server —
is using. The bytes of a tensor need no wrapping: DCP's index (``metadata.json``, see ``metadata_json.py``) already
records each item's dtype, size and chunk, and the item's offset and length in the file. So items are written as
their raw bytes, and read back with ``torch.frombuffer`` — never unpickled.

Each item's storage info carries the descriptor ``RAW``; DCP's own reader does not know it and refuses such a file
instead of misreading it. Checkpoints written before (``torch.save`` records) are still read, by DCP's code.
"""

from __future__ import annotations

import io

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index  # what DCP's reader uses
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

RAW = "distgpt-raw-v1"


def is_raw(info: _StorageInfo) -> bool:
    """Whether an item was written by ``write_items`` (raw bytes) rather than by DCP (``torch.save``)."""
    return RAW in (info.transform_descriptors or ())


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_items(stream, file_name: str, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
    """Write every item of ``plan`` to ``stream`` (the file ``file_name``); return DCP's write results."""
    results = []
    for item in plan.items:
        data = planner.resolve_data(item)
        offset = stream.tell()
        if item.type == WriteItemType.BYTE_IO:
            stream.write(data.getbuffer())
        else:
            stream.write(_tensor_bytes(data))
        length = stream.tell() - offset
        results.append(WriteResult(index=item.index, size_in_bytes=length,
                                   storage_data=_StorageInfo(file_name, offset, length, transform_descriptors=[RAW])))
    return results


def read_items(data: memoryview, reqs: list[ReadItem], storage_data: dict, metadata: Metadata,
               planner: LoadPlanner) -> None:
    """Serve ``reqs`` from ``data`` (one whole shard file): bytes to the planner, tensors copied into its targets
    (a resharded load asks for a slice of a stored chunk: ``narrow_tensor_by_index``)."""
    for req in reqs:
        info: _StorageInfo = storage_data[req.storage_index]
        raw = data[info.offset : info.offset + info.length]
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(raw.tobytes()))
            continue
        tensor = narrow_tensor_by_index(_stored_chunk(raw, req, metadata), req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def _stored_chunk(raw: memoryview, req: ReadItem, metadata: Metadata) -> torch.Tensor:
    """The stored chunk ``req`` reads from, over its bytes (dtype and shape from DCP's metadata; no copy)."""
    md = metadata.state_dict_metadata[req.storage_index.fqn]
    assert isinstance(md, TensorStorageMetadata)
    chunk = next(c for c in md.chunks if tuple(c.offsets) == tuple(req.storage_index.offset))
    if raw.nbytes == 0:
        return torch.empty(chunk.sizes, dtype=md.properties.dtype)
    return torch.frombuffer(raw, dtype=md.properties.dtype).reshape(chunk.sizes)
