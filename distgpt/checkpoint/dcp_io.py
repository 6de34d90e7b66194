"""DCP's reader and writer over ``pyarrow.fs`` (the storage helpers themselves are ``distgpt.storage``).

DCP's ``FileSystemWriter`` / ``FileSystemReader`` do the planning, metadata and resharding; they need a small
filesystem interface, which ``ArrowFileSystem`` provides for any pyarrow URI (s3://, gs://, file://, paths). Items are
stored as raw bytes (``records.py``) and DCP's index as JSON (``metadata_json.py``): loading a checkpoint unpickles
nothing. A rank fetches only the shard files holding what it needs, each in one request, and checks it against the
manifest before using it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import warnings
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import TypeVar

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from distgpt import storage
from distgpt.checkpoint import metadata_json, records
from distgpt.errors import DistgptError

T = TypeVar("T")


def first_error(e: BaseException) -> str:
    """The root message of a storage failure; DCP's CheckpointException (a BaseException, the same on every rank)
    wraps per-rank tracebacks whose last line is the cause."""
    if isinstance(e, CheckpointException):
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else type(e).__name__
    return f"{type(e).__name__}: {e}"


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4) -> T:
    """``storage.with_retries`` for DCP calls: DCP failures (CheckpointException) reach every rank alike, so all
    ranks retry together."""
    return storage.with_retries(fn, what, attempts, transient=(OSError, CheckpointException), describe=first_error)


class _HashingStream:
    """An output stream that hashes what passes through it, so checksums cost no second read."""

    def __init__(self, inner, on_close: Callable[[int, str], None]):
        self._inner, self._hash, self._size, self._on_close = inner, hashlib.sha256(), 0, on_close

    def write(self, data) -> int:
        self._hash.update(data)
        self._size += memoryview(data).nbytes
        return self._inner.write(data)

    def flush(self) -> None:
        """Deliberately nothing: DCP flushes after every tensor, and a pyarrow S3 stream's flush waits for all of its
        in-flight part uploads — which would serialise uploading with serialising. Closing the stream (at the end of
        the file) completes the upload; only a complete file is ever visible."""

    def finish(self) -> None:
        self._on_close(self._size, self._hash.hexdigest())

    def __getattr__(self, name):  # tell(), flush(), … go to the real stream
        return getattr(self._inner, name)


class ArrowFileSystem(FileSystemBase):
    """DCP filesystem on a pyarrow filesystem; paths are pyarrow paths under the resolved URI.

    Writes record (size, sha256) of every file in ``written``. Reads fetch each file once, check it against
    ``expected`` (name → (size, sha256)) when given, and serve DCP's byte-range reads from memory.
    """

    def __init__(self) -> None:
        self.fs: pafs.FileSystem | None = None
        self.written: dict[str, tuple[int, str]] = {}
        self.expected: dict[str, tuple[int, str]] = {}

    def init_path(self, path: str | os.PathLike, **kwargs) -> str:
        self.fs, resolved = storage.resolve(os.fspath(path))
        return resolved

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator:
        assert self.fs is not None
        p = os.fspath(path)
        name = posixpath.basename(p)
        if "w" in mode:
            with self.fs.open_output_stream(p) as f:
                stream = _HashingStream(f, lambda size, digest: self.written.__setitem__(name, (size, digest)))
                yield stream
            stream.finish()
            return
        with self.fs.open_input_stream(p) as f:
            data = f.read()
        if name in self.expected:
            size, digest = self.expected[name]
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise OSError(f"{name} is corrupt (checksum mismatch)")  # read_into: not transient
        yield io.BytesIO(data)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.move(os.fspath(path), os.fspath(new_path))

    def mkdir(self, path: str | os.PathLike) -> None:
        self.fs.create_dir(os.fspath(path), recursive=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, str)

    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.get_file_info(os.fspath(path)).type != pafs.FileType.NotFound

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.delete_file(os.fspath(path))


SAVE_ATTEMPTS = 4
"""Tries per checkpoint file (backoff 0.5 s, 1 s, 2 s between them) before the save fails."""


class ArrowWriter(FileSystemWriter):
    """DCP writer to a pyarrow URI (one file per rank).

    Each rank's writer also leaves the sizes and checksums of its files in a small side file
    (``checksums-rank<r>.json``, read back by ``read_checksums``): a save running in a background process cannot
    hand them back in memory."""

    def __init__(self, uri: str):
        super().__init__(uri, single_file_per_rank=True, sync_files=False)  # object stores commit on close
        self.fs = ArrowFileSystem()
        self.path = self.fs.init_path(uri)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items to its one file as raw bytes (``records.py``), then its checksums side file."""
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"  # DCP's name for rank r's first file: __r_0.distcp

        def shard() -> list[WriteResult]:
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
                return records.write_items(stream, name, plan, planner)

        # Each file is retried whole with backoff (a flaky store, a reset connection); only then does the save fail.
        # Here, not around the save: an async save's upload runs in DCP's background process.
        results = storage.with_retries(shard, f"writing {name}", attempts=SAVE_ATTEMPTS)
        rank = int(plan.storage_data.prefix.strip("_"))
        sums = json.dumps(self.fs.written).encode()
        storage.with_retries(lambda: self._write(_checksums_name(rank), sums), "writing checksums",
                             attempts=SAVE_ATTEMPTS)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write DCP's index as JSON (``metadata_json.FILE``), not DCP's pickle (on the coordinator). One write of
        the final name: the manifest, written after it, is what commits the checkpoint."""
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        index = metadata_json.dumps(metadata)
        storage.with_retries(lambda: self._write(metadata_json.FILE, index), "writing the index",
                             attempts=SAVE_ATTEMPTS)

    def _write(self, name: str, data: bytes) -> None:
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as f:
            f.write(data)

    def __setstate__(self, state: dict) -> None:
        # Only DCP's background save process unpickles a writer. DCP sets that process's root logger to INFO and
        # would print three lines per save on every rank; distgpt reports saves itself, so warnings only.
        self.__dict__.update(state)
        logging.getLogger().setLevel(logging.WARNING)


def _checksums_name(rank: int) -> str:
    return f"checksums-rank{rank}.json"


def read_checksums(uri: str, rank: int) -> dict[str, tuple[int, str]]:
    """{file name: (bytes, sha256)} of what ``rank``'s writer wrote under ``uri``."""
    data = json.loads(storage.read_bytes(storage.join(uri, _checksums_name(rank))))
    return {name: (size, digest) for name, (size, digest) in data.items()}


class TrustWarning(UserWarning):
    """A pickled checkpoint index is being read because the user said they trust it."""


class PickledMetadataError(DistgptError, RuntimeError):
    """A checkpoint whose index is DCP's pickle (written before distgpt stored it as JSON), loaded untrusted."""


def pickled_refusal(uri: str) -> str:
    """Why a checkpoint with DCP's pickled index is not loaded, and how to load it anyway."""
    return (f"{storage.redact(uri)} was written by an earlier distgpt: its index is a pickle (.metadata), and "
            "loading it would run whatever code the file holds. If you trust where it came from, either convert it "
            "once (`distgpt checkpoint export ROOT --out DIR --trust-pickled-metadata`, then use DIR) or resume "
            "training from it with --checkpoint.trust_pickled_metadata=true (its next save writes the index as JSON)")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that a stored non-tensor value is read with ``torch.load(weights_only=True)``
    (DCP's own passes ``weights_only=False``: a pickle that can run code). distgpt's checkpoints store tensors only;
    this keeps a planted byte item from being a way in."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise OSError(f"item {read_item.dest_index.fqn} is a pickled object, not plain data: refused (a "
                          "checkpoint's contents are never unpickled)") from None
        if self.flatten_state_dict:  # what DefaultLoadPlanner.load_bytes does with the value, minus the pickle
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class ArrowReader(FileSystemReader):
    """DCP reader from a pyarrow URI: raw-bytes shards (``records.py``), or DCP's own ``torch.save`` records.

    The index is read from ``metadata.json``. A checkpoint that has only DCP's pickled ``.metadata`` (written by an
    earlier distgpt) is refused unless ``trust_pickled`` — unpickling a file can run any code its author chose."""

    def __init__(self, uri: str, trust_pickled: bool = False):
        super().__init__(uri)
        self.fs = ArrowFileSystem()
        self.path = self.fs.init_path(uri)
        self.uri, self.trust_pickled = uri, trust_pickled
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        """The index, parsed from JSON; DCP's pickle only when trusted (with a warning)."""
        path = self.fs.concat_path(self.path, metadata_json.FILE)
        if self.fs.exists(path):
            with self.fs.create_stream(path, "rb") as f:  # checked against the manifest when it is expected
                try:
                    metadata = metadata_json.loads(f.getvalue())
                except metadata_json.MetadataFormatError as e:
                    raise OSError(f"{metadata_json.FILE} is unreadable: {e}") from None
            metadata.storage_meta.load_id = self.load_id
            return metadata
        if not self.fs.exists(self.fs.concat_path(self.path, ".metadata")):
            raise OSError(f"{metadata_json.FILE} does not exist (No such file)")
        if not self.trust_pickled:
            raise PickledMetadataError(pickled_refusal(self.uri))
        warnings.warn(f"unpickling the index of {storage.redact(self.uri)} (--trust-pickled-metadata): only do "
                      "this for checkpoints you wrote", TrustWarning, stacklevel=2)
        return super().read_metadata(*args, **kwargs)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._metadata = metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not any(records.is_raw(self.storage_data[r.storage_index]) for r in plan.items):
            return super().read_data(plan, planner)  # a checkpoint from before raw records
        assert self._metadata is not None
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as stream:  # whole file, checked
                records.read_items(stream.getbuffer(), reqs, self.storage_data, self._metadata, planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
