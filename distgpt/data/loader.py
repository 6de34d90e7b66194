"""Deterministic, resumable loading of prepared samples for any number of data-parallel ranks.

The order is a pure function: global sample index g (counted from the start of training, across epochs) maps to
epoch e = g // N, position p = g % N, and sample ``perm(seed, e)[p]``. Step s consumes global indices
[s·B, (s+1)·B) for global batch B; data-parallel rank r takes its contiguous share of that range. So every rank
computes its own samples with no communication, the loader's whole state is two integers (seed, consumed), and a
run resumed with another data-parallel size (or other batch shares) continues at exactly the next global index —
nothing repeated, nothing skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from distgpt import storage
from distgpt.data.prepare import FORMAT, MANIFEST
from distgpt.data.tokenizer import Tokenizer, tokenizer_from_json
from distgpt.errors import DistgptError


class DatasetError(DistgptError, ValueError):
    """A prepared dataset is missing or unusable; the message says how to fix it."""


def read_manifest(uri: str) -> dict:
    """The manifest of the prepared dataset at ``uri``."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
    except storage.StorageError:
        raise DatasetError(
            f"no prepared dataset at {storage.redact(uri)} (no {MANIFEST}) — run `distgpt data prepare JOB` first"
        ) from None
    except ValueError as e:  # truncated or not JSON
        raise DatasetError(f"{storage.redact(uri)}/{MANIFEST} is corrupt ({e}) — prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(
            f"{storage.redact(uri)}: unknown dataset format "
            f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}; expected {FORMAT} — "
            f"prepare it again with this version of distgpt"
        )
    return manifest


def load_tokenizer(uri: str) -> Tokenizer:
    """The tokenizer saved with the prepared dataset at ``uri``."""
    return tokenizer_from_json(storage.read_bytes(storage.join(uri, "tokenizer.json")).decode())


class TokenDataset:
    """One split of a prepared dataset: (N, seq_len + 1) arrays by column — ``tokens`` always; chat data adds
    ``roles`` and ``segments`` (``data/chat.py``). Local shards are memory-mapped."""

    def __init__(self, uri: str, split: str = "train"):
        self.manifest = read_manifest(uri)
        if split not in self.manifest["splits"]:
            raise DatasetError(f"{storage.redact(uri)} has no split {split!r}")
        info = self.manifest["splits"][split]
        self.seq_len: int = self.manifest["seq_len"]
        shards = [self._open_shard(storage.join(uri, s["file"]), s) for s in info["shards"]]
        self.columns: dict[str, np.ndarray] = {
            name: shards[0][name] if len(shards) == 1 else np.concatenate([sh[name] for sh in shards])
            for name in shards[0]}
        self.samples = self.columns["tokens"]
        if len(self.samples) == 0:
            raise DatasetError(f"{storage.redact(uri)}: split {split!r} holds no samples")

    def _open_shard(self, uri: str, entry: dict) -> dict[str, np.ndarray]:
        """One shard's columns, after checking it against the manifest: its size always, its sha256 the first
        time this process opens it (a truncated or altered shard is one clear error, never a misread)."""
        fs, path = storage.resolve(uri)
        try:
            if isinstance(fs, pafs.LocalFileSystem):
                data = pa.memory_map(path).read_buffer()  # zero-copy: the OS pages samples in on demand
            else:
                data = pa.py_buffer(storage.read_bytes(uri))
        except FileNotFoundError:
            raise DatasetError(f"{storage.redact(uri)} is missing — prepare the data again") from None
        _check_shard(uri, data, entry)
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{storage.redact(uri)} is not a readable shard ({e}) — prepare the data again"
                               ) from None
        out = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            out[name] = col.values.to_numpy(zero_copy_only=True).reshape(-1, self.seq_len + 1)
        if len(out["tokens"]) != entry["num_samples"]:
            raise DatasetError(f"{storage.redact(uri)} holds {len(out['tokens'])} samples, manifest says "
                               f"{entry['num_samples']}")
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def take(self, ids: np.ndarray) -> torch.Tensor:
        """Samples ``ids`` as an int64 tensor (k, seq_len + 1)."""
        return torch.from_numpy(self.samples[ids].astype(np.int64))

    def take_columns(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Samples ``ids`` of every column, each an int64 tensor (k, seq_len + 1)."""
        return {name: torch.from_numpy(col[ids].astype(np.int64)) for name, col in self.columns.items()}

    def rows(self, seed: int, start: int, count: int, shuffle: bool = True) -> dict[str, torch.Tensor]:
        """Columns of global sample positions start .. start+count-1 (the order: ``sample_ids``)."""
        return self.take_columns(sample_ids(len(self), seed, start, count, shuffle))


_VERIFIED: set[tuple[str, str]] = set()
"""(shard URI, sha256) pairs this process has hashed already: reopening a dataset does not hash it again."""


def _check_shard(uri: str, data, entry: dict) -> None:
    """Size (always) and sha256 (once per process) of a shard against its manifest entry."""
    size = memoryview(data).nbytes
    if "bytes" in entry and size != entry["bytes"]:
        raise DatasetError(f"{storage.redact(uri)} has {size} bytes, the manifest says {entry['bytes']} — the shard "
                           "is truncated or was replaced: prepare the data again (`distgpt data prepare JOB`)")
    key = (uri, entry.get("sha256", ""))
    if key[1] and key not in _VERIFIED:
        if hashlib.sha256(data).hexdigest() != key[1]:
            raise DatasetError(f"{storage.redact(uri)} does not match its checksum in the manifest — the shard is "
                               "corrupt: prepare the data again (`distgpt data prepare JOB`)")
        _VERIFIED.add(key)


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sample ids for one epoch: a pure function of (n, seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_ids(n: int, seed: int, start: int, count: int, shuffle: bool = True) -> np.ndarray:
    """Sample ids of global indices start .. start+count-1 (crossing epoch boundaries as needed)."""
    g = np.arange(start, start + count)
    if not shuffle:
        return g % n
    out = np.empty(count, dtype=np.int64)
    epochs = g // n
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(n, seed, int(e))[g[sel] % n]
    return out


class DataLoader:
    """Yields this rank's (inputs, targets) for each step; state is (seed, consumed global samples)."""

    def __init__(
        self,
        dataset: TokenDataset,
        global_batch: int,
        seed: int,
        dp_rank: int = 0,
        shares: Sequence[int] | None = None,
        shuffle: bool = True,
    ):
        self.dataset = dataset
        self.global_batch = global_batch
        self.seed = seed
        self.shares = list(shares) if shares is not None else [global_batch]
        if sum(self.shares) != global_batch or min(self.shares) < 0:
            raise ValueError(f"batch shares {self.shares} must be non-negative and sum to {global_batch}")
        self.dp_rank = dp_rank
        self.offset = sum(self.shares[:dp_rank])
        self.shuffle = shuffle
        self.consumed = 0

    def next_ids(self) -> np.ndarray:
        """This rank's sample ids for the next step; advances the state by one global batch."""
        ids = sample_ids(
            len(self.dataset), self.seed, self.consumed + self.offset, self.shares[self.dp_rank], self.shuffle
        )
        self.consumed += self.global_batch
        return ids

    def next_columns(self) -> dict[str, torch.Tensor]:
        """This rank's rows for the next step, by column, each (share, seq_len + 1) int64: ``tokens`` (inputs and
        shifted targets), and whatever else the dataset holds; an objective turns the columns into its batch."""
        rows = self.dataset.rows(self.seed, self.consumed + self.offset, self.shares[self.dp_rank], self.shuffle)
        self.consumed += self.global_batch
        return rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (share, seq_len) int64 — for hand-written reference loops."""
        s = self.dataset.take(self.next_ids())
        return s[:, :-1].contiguous(), s[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        """The two integers that fully determine where the loader is."""
        return {"seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (which may come from a run with another data-parallel size)."""
        self.seed, self.consumed = int(state["seed"]), int(state["consumed"])
