"""Sharded checkpoints committed by a manifest written last; loadable into a different Plan.

Layout under the checkpoint root (any pyarrow URI)::

    step-00000120/__0_0.distcp …   each rank's shards (DCP), written by that rank; nothing is gathered
    step-00000120/metadata.json    DCP's index of every tensor shard, as data (``metadata_json.py``; never a pickle)
    step-00000120/manifest.json    files with sizes and sha256, step, Plan, model config, loader and RNG states

A checkpoint exists only once its manifest exists. Loading goes through DCP against the *current* engine's state
dicts, so DTensor (FSDP2, TP) and pipeline-stage layouts are resharded on the fly and each rank reads only what it
needs. Every engine gives its state under the model's canonical parameter names (``parallel/naming.py``; DeepSpeed
ZeRO partitions through ``parallel/ds_state.py``), so checkpoints of every Plan reshard into every other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import DTensor

from distgpt import storage
from distgpt.checkpoint import metadata_json, signing
from distgpt.checkpoint.dcp_io import (
    SAVE_ATTEMPTS,
    ArrowReader,
    ArrowWriter,
    SafeLoadPlanner,
    first_error,
    pickled_refusal,
    read_checksums,
    with_retries,
)
from distgpt.checkpoint.layout import (  # noqa: F401 — CheckpointError, list_checkpoints: also imported from here
    MANIFEST,
    CheckpointError,
    Committed,
    committed,
    list_checkpoints,
    read_manifest,
    step_uri,
)
from distgpt.checkpoint.snapshot import CpuSnapshotStager, on_cpu
from distgpt.parallel.mesh import ensure_process_group
from distgpt.storage import StorageError, StorageIOError, delete_dir, list_dir, redact


def _dist() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(obj):
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


HYPER = "param_groups."


def _stored_state(engine) -> tuple[dict, dict]:
    """(the state a checkpoint stores, the optimizer hyper-parameters it leaves out).

    The flattened optimizer state repeats its group's hyper-parameters (lr, betas, eps, weight decay and 7 flags)
    for every parameter. They come from the job, which the manifest stores whole, and lr is recomputed from the
    schedule at every step — yet stored they were 3/4 of DCP's items, each its own small pickle, and most of a
    save's serialisation time. A load keeps the values the engine was built with (a checkpoint that has them
    still loads: DCP reads only the keys asked for)."""
    msd, osd = engine.state_dicts()
    hyper = {k: v for k, v in osd.items() if k.startswith(HYPER)}
    return {"model": msd, "optim": {k: v for k, v in osd.items() if not k.startswith(HYPER)}}, hyper


def _local_bytes(value) -> int:
    """Bytes this rank holds of a state-dict value (a DTensor's local shard)."""
    if isinstance(value, dict | list | tuple):
        return sum(_local_bytes(v) for v in (value.values() if isinstance(value, dict) else value))
    if isinstance(value, DTensor):
        value = value.to_local()
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _agree(error: str, what: str) -> None:
    """Collective: raise StorageError on every rank if ``error`` is set on any (this rank's text, or a note that
    another rank failed) — so a failed save is the same event everywhere and no rank waits on one that gave up."""
    failed = torch.tensor([1 if error else 0])
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise StorageError(f"{what} failed: {error or 'another rank could not write its part'}")


def _sha256(uri: str) -> tuple[int, str]:
    data = storage.read_bytes(uri)
    return len(data), hashlib.sha256(data).hexdigest()


@dataclass
class _Pending:
    """An asynchronous save whose shards are still being written."""

    step: int
    uri: str
    future: object
    staged: object
    """Done once the state is copied to host memory; parameters must not change before that."""
    meta: dict
    tokenizer_json: str
    rng: list
    started: float
    blocked: float = 0.0
    """Seconds training waited for this save: the call, then optimizer steps waiting for the snapshot."""


class CheckpointManager:
    """Save / list / load / retain checkpoints under ``root``."""

    def __init__(self, root: str, keep_last: int = 3, keep_every: int = 0, upload: str = "process",
                 trust_pickled: bool = False):
        self.root, self.keep_last, self.keep_every, self.upload = root, keep_last, keep_every, upload
        self.trust_pickled = trust_pickled
        """Load checkpoints whose index is DCP's pickle (an earlier distgpt's); see ``dcp_io.pickled_refusal``."""
        self.pending: _Pending | None = None
        self._stager: AsyncStager | None = None
        self._group = None  # background writes talk over their own group, never the training one
        self._hooked: set[int] = set()
        self.committed_step = -1
        """Step of the newest checkpoint this manager committed or loaded (-1: none yet)."""

    def uri(self, step: int) -> str:
        """The directory of ``step``'s checkpoint."""
        return step_uri(self.root, step)

    def committed(self) -> list[Committed]:
        """Checkpoints with a manifest, oldest first."""
        return committed(self.root)

    def save(self, step: int, engine, meta: dict, tokenizer_json: str = "") -> str:
        """Collective, blocking: every rank writes its shards; rank 0 commits. Returns a line for the log."""
        self.wait()
        uri = self.uri(step)
        t0 = time.perf_counter()
        state, _ = _stored_state(engine)
        writer = ArrowWriter(uri)

        def write():
            writer.fs.written.clear()
            dcp.save(state, storage_writer=writer)

        with_retries(write, f"saving {redact(uri)}", attempts=1)  # each file is retried inside (dcp_io)
        self._commit(step, uri, meta, tokenizer_json, _gather(torch.get_rng_state().tolist()), writer.fs.written)
        return f"{redact(uri)} saved in {time.perf_counter() - t0:.2f}s (blocking)"

    def save_async(self, step: int, engine, meta: dict, tokenizer_json: str = "") -> float:
        """Collective: snapshot the state to host memory and write it in the background (at most one save in
        flight: a previous one is finished and committed first). Returns the seconds training was stalled here.

        The snapshot is copied on a background thread while the next forward and backward run; the optimizer's
        next step waits for it (``wait_staged``, hooked before every optimizer step), since that is the first moment
        the parameters change. Serialising and uploading then happen in DCP's background process (``upload =
        "process"``: the snapshot is staged in shared memory, so nothing is copied again and no GIL is shared with
        training) or on a thread of this process (``"thread"``)."""
        self.wait()
        t0 = time.perf_counter()
        self._background_group()
        self._hook(engine)
        state, _ = _stored_state(engine)
        uri = self.uri(step)
        writer = ArrowWriter(uri)
        self._check_shared_memory(*state.values())
        kind = AsyncCheckpointerType.PROCESS if self.upload == "process" else AsyncCheckpointerType.THREAD
        resp = dcp.async_save(state, storage_writer=writer, process_group=self._group,
                              async_checkpointer_type=kind, async_stager=self._stager_for_save(state))
        rng = _gather(torch.get_rng_state().tolist())
        self.pending = _Pending(step, uri, resp.upload_completion, resp.staging_completion, meta, tokenizer_json,
                                rng, t0, time.perf_counter() - t0)
        return self.pending.blocked

    def _background_group(self) -> None:
        """A gloo group of all ranks for the background saves' own collectives (never the training group). DCP's
        save process needs a process group even for one rank, so a one-rank run gets one, on loopback."""
        ensure_process_group()
        if self._group is None:
            self._group = dist.new_group(backend="gloo")

    def _check_shared_memory(self, *state: dict) -> None:
        """The process upload stages the rank's state in /dev/shm; where that cannot hold it (containers often give
        64 MiB), writing the snapshot would kill the process with SIGBUS — so use the thread upload, and say so."""
        if self.upload != "process" or self._stager is not None or not os.path.isdir("/dev/shm"):
            return
        need = sum(_local_bytes(v) for sd in state for v in sd.values())
        free = shutil.disk_usage("/dev/shm").free
        if free < 1.1 * need:
            warnings.warn(f"/dev/shm has {free / 2**20:.0f} MiB free, the checkpoint snapshot needs "
                          f"{need / 2**20:.0f} MiB: uploading on a thread instead of a background process (give the "
                          "container more shared memory, e.g. docker --shm-size, to upload from a process)",
                          stacklevel=3)
            self.upload = "thread"

    def _stager_for_save(self, state: dict) -> AsyncStager:
        """One stager per manager: it keeps its host buffers (shared memory for the save process; pinned on a GPU)
        and refills them at each save instead of allocating the state's size again. CPU state gets a stager that
        copies without holding the GIL (see ``snapshot.py``); GPU state DCP's own."""
        if self._stager is None:
            if on_cpu(state):
                self._stager = CpuSnapshotStager(shared=self.upload == "process")
            else:
                self._stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_non_blocking_copy=True,
                                                            use_shared_memory=self.upload == "process",
                                                            use_async_staging=True))
        return self._stager

    def wait_staged(self) -> None:
        """Block until the in-flight save's snapshot is in host memory (no-op when there is none)."""
        if self.pending is not None and not self.pending.staged.done():
            t0 = time.perf_counter()
            self.pending.staged.result()
            self.pending.blocked += time.perf_counter() - t0

    def _hook(self, engine) -> None:
        """Make every optimizer step of ``engine`` wait for the snapshot first (registered once per optimizer)."""
        opt = engine.base_optimizer  # under DeepSpeed, the torch optimizer inside ZeRO's
        if id(opt) not in self._hooked:
            opt.register_step_pre_hook(lambda *_: self.wait_staged())
            self._hooked.add(id(opt))

    def poll(self) -> str | None:
        """Commit the in-flight save if every rank has finished writing (collective when one is pending)."""
        if self.pending is None:
            return None
        done = torch.tensor([1 if self.pending.future.done() else 0])
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait() if done.item() else None

    def wait(self) -> str | None:
        """Finish and commit the in-flight save, if any (collective)."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        error = ""
        try:
            p.future.result()
            written = read_checksums(p.uri, _dist()[0])
        except BaseException as e:  # a storage failure: the previous commit stays the latest
            error = redact(first_error(e))
        _agree(error, f"background save of step {p.step} to {redact(p.uri)}")  # every rank fails alike, or none
        self._commit(p.step, p.uri, p.meta, p.tokenizer_json, p.rng, written)
        return (f"{redact(p.uri)} committed {time.perf_counter() - p.started:.2f}s after it started (async; training "
                f"waited {p.blocked * 1e3:.0f} ms for it)")

    def _commit(self, step: int, uri: str, meta: dict, tokenizer_json: str, rng: list,
                written: dict[str, tuple[int, str]]) -> None:
        """Checksums (hashed while writing) from every rank, then the tokenizer and the manifest from rank 0."""
        rank, _ = _dist()
        files = _gather({k: v for k, v in written.items() if k.startswith("__")})
        error = ""
        if rank == 0:
            try:
                    storage.with_retries(lambda: self._write_manifest(step, uri, files, tokenizer_json, rng, meta),
                                     f"writing the manifest of step {step}", attempts=SAVE_ATTEMPTS)
            except StorageError as e:
                error = str(e)
            self._retain_quietly()
        _agree(error, f"committing step {step} to {redact(uri)}")
        self.committed_step = step

    def _write_manifest(self, step: int, uri: str, files: list[dict], tokenizer_json: str, rng: list,
                        meta: dict) -> None:
        """Rank 0: the tokenizer, then the manifest — the commit — then retention."""
        merged = {k: v for part in files for k, v in part.items()}
        # the index is written by the coordinator's writer (maybe in DCP's save process): hash the small file here
        merged[metadata_json.FILE] = _sha256(storage.join(uri, metadata_json.FILE))
        if tokenizer_json:
            storage.write_bytes(storage.join(uri, "tokenizer.json"), tokenizer_json.encode())
            merged["tokenizer.json"] = _sha256(storage.join(uri, "tokenizer.json"))
        manifest = {"format": "distgpt-checkpoint/1", "step": step, "saved_unix": time.time(),
                    "files": {k: {"bytes": b, "sha256": h} for k, (b, h) in sorted(merged.items())},
                    "rng": rng, **meta}
        storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(signing.sign(manifest)).encode())  # commit

    def _retain_quietly(self) -> None:
        """Retention after a commit: a storage failure here costs disk space, not the save (the next one retries)."""
        try:
            self.retain()
        except StorageError as e:
            warnings.warn(f"retention after a checkpoint commit failed ({e}); old checkpoints stay until the next "
                          "commit", stacklevel=2)

    def retain(self) -> None:
        """Keep the last ``keep_last`` checkpoints (and every ``keep_every``-th step); delete the rest and any
        uncommitted leftovers older than the newest commit."""
        done = self.committed()
        keep = {c.step for c in done[-self.keep_last :]}
        keep |= {c.step for c in done if self.keep_every and c.step % self.keep_every == 0}
        newest = done[-1].step if done else -1
        for info in list_dir(self.root):
            if not info.base_name.startswith("step-") or not info.base_name[5:].isdigit():
                continue  # a stray directory (step-abc, a user's notes) is not ours to delete, nor an error
            step = int(info.base_name[5:])
            if step not in keep and step <= newest:
                delete_dir(storage.join(self.root, info.base_name))

    def verify(self, c: Committed) -> dict:
        """The manifest, after checking every file's size and sha256; CheckpointError names the first bad one."""
        manifest = read_manifest(c.uri)
        for name, want in manifest["files"].items():
            try:
                size, digest = _sha256(storage.join(c.uri, name))
            except StorageError:
                raise CheckpointError(f"{redact(c.uri)}: file {name} is missing") from None
            if (size, digest) != (want["bytes"], want["sha256"]):
                raise CheckpointError(f"{redact(c.uri)}: file {name} is corrupt (checksum mismatch)")
        return manifest

    def load(self, engine, step: int | None = None, fallback: bool = False) -> dict:
        """Load the latest (or the given) committed checkpoint into ``engine``, resharding to its Plan.
        With ``fallback``, a corrupt checkpoint is skipped for the previous good one. Returns the manifest."""
        done = [c for c in self.committed() if step is None or c.step == step]
        if not done:
            raise CheckpointError(f"no committed checkpoint{f' at step {step}' if step is not None else ''} under "
                                  f"{redact(self.root)}")
        errors = []
        for c in reversed(done):
            try:
                manifest, state = self._read(c, engine)
                break
            except CheckpointError as e:
                errors.append(str(e))
                if not fallback:
                    raise
        else:
            raise CheckpointError("no good checkpoint: " + "; ".join(errors))
        engine.load_state_dicts(state["model"], state["optim"])
        self.committed_step = manifest["step"]
        rank, world = _dist()
        if len(manifest["rng"]) == world:  # same world: every rank continues its own random stream
            torch.set_rng_state(torch.tensor(manifest["rng"][rank], dtype=torch.uint8))
        return manifest

    def _read(self, c: Committed, engine) -> tuple[dict, dict]:
        """(manifest, state read into this engine's layout)."""
        state, hyper = _stored_state(engine)
        manifest = self.read_into(c, state)
        state["optim"].update(hyper)  # the engine's own hyper-parameters (see _stored_state)
        return manifest, state

    def read_into(self, c: Committed, state: dict) -> dict:
        """Fill ``state`` (its tensors give the layout: resharded as needed) from checkpoint ``c``; return its
        manifest. Every file a rank reads — the index included — is checked against the manifest's size and sha256
        as it arrives; a missing or corrupt one, or a pickled index not trusted, raises CheckpointError on every
        rank. Nothing is unpickled (``SafeLoadPlanner``, ``metadata_json``)."""
        manifest = read_manifest(c.uri)
        expected = {k: (v["bytes"], v["sha256"]) for k, v in manifest["files"].items()}
        if metadata_json.FILE not in expected and not self.trust_pickled:  # refused before any rank reads it
            raise CheckpointError(pickled_refusal(c.uri))
        reader = ArrowReader(c.uri, self.trust_pickled)
        reader.fs.expected = expected
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
        except (CheckpointException, OSError) as e:
            msg = first_error(e)
            missing = "not exist" in msg or "NotFound" in msg or "No such file" in msg
            if storage.is_transient(msg):  # an outage, not the checkpoint's fault: loading an older one would be wrong
                raise StorageIOError(f"reading {redact(c.uri)} failed: {redact(msg)}") from None
            raise CheckpointError(f"{redact(c.uri)}: {'a shard file is missing' if missing else redact(msg)}"
                                  ) from None
        return manifest
