"""Corpus → tokenizer + fixed-length token samples in Arrow IPC shards + a manifest written last.

Layout of a prepared dataset (a local directory or any pyarrow.fs URI)::

    tokenizer.json                     the tokenizer (see data/tokenizer.py)
    train-00000.arrow ...              column ``tokens``: fixed_size_list<uint16|uint32>[seq_len + 1]
    val-00000.arrow ...
    manifest.json                      sample counts, shards with sizes and sha256, tokenizer, sources

Documents are joined with the end-of-text token into one stream; sample i holds tokens [i·T, i·T + T] (T + 1 tokens:
inputs and shifted targets), so every token except the first is a target exactly once. The last ``val_fraction`` of
the stream is the validation split (as nanoGPT does), so no validation token is ever trained on.
Arrow IPC (uncompressed) rather than Parquet: the loader memory-maps it and reads any sample in O(1).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from distgpt import storage
from distgpt.data.chat import REPLY, read_conversations, render, to_rows
from distgpt.data.sources import SourceFile, expand_sources, read_documents
from distgpt.data.tokenizer import CHAT_TOKENS, Tokenizer, tokenizer_from_json, train_tokenizer
from distgpt.errors import DistgptError

MANIFEST = "manifest.json"
FORMAT = "distgpt-data/1"


@dataclass(frozen=True)
class PrepareSpec:
    """What to prepare and how (the ``[data]`` section of a job maps onto this)."""

    sources: tuple[str, ...]
    out: str
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    text_field: str = "text"
    max_bytes: int = 0  # 0: the whole corpus
    shard_samples: int = 100_000
    tokenizer_train_bytes: int = 50_000_000  # BPE merges are learned from at most this much text
    format: str = "text"
    """'text': documents joined into one token stream; 'chat': conversations in the chat template (data/chat.py)."""
    packing: bool = False
    """chat: several conversations per row (segment ids keep them apart) instead of one per row, padded."""
    base_tokenizer: str = ""
    """A tokenizer (its JSON) to use instead of training one: the model's, when fine-tuning from it."""


class PrepareError(DistgptError, ValueError):
    """The corpus cannot become a dataset as asked; the message says why and what to change."""


def documents(files: list[SourceFile], text_field: str, max_bytes: int) -> Iterator[str]:
    """The documents of ``files`` in order, at most ``max_bytes`` of text in all (0: everything)."""
    used = 0
    for f in files:
        for doc in read_documents(f, text_field):
            if max_bytes and used >= max_bytes:
                return
            if max_bytes:
                doc = doc[: max_bytes - used]
            used += len(doc.encode("utf-8")) if max_bytes else 0
            yield doc


def _encode_stream(tok: Tokenizer, docs: Iterator[str], batch: int = 256) -> np.ndarray:
    """All documents as one int64 token stream, each followed by the end-of-text token."""
    parts: list[np.ndarray] = []
    buf: list[str] = []
    eot = np.array([tok.eot_id], dtype=np.int64)

    def flush() -> None:
        for ids in tok.encode_batch(buf):
            parts.extend((np.asarray(ids, dtype=np.int64), eot))
        buf.clear()

    for doc in docs:
        buf.append(doc)
        if len(buf) >= batch:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _samples(stream: np.ndarray, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """(N, seq_len + 1) windows with stride seq_len (consecutive samples share one boundary token)."""
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        return np.zeros((0, seq_len + 1), dtype=dtype)
    view = np.lib.stride_tricks.sliding_window_view(stream[: n * seq_len + 1], seq_len + 1)[::seq_len]
    return np.ascontiguousarray(view, dtype=dtype)


def _write_shards(out: str, split: str, columns: dict[str, np.ndarray], shard_samples: int) -> list[dict]:
    """Shards of fixed-size-list columns (every column has the rows as its first dimension)."""
    shards = []
    n, width = columns["tokens"].shape
    for k, start in enumerate(range(0, n, shard_samples)):
        table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(col[start : start + shard_samples]
                                                                            .reshape(-1)), width)
                          for name, col in columns.items()})
        chunk = columns["tokens"][start : start + shard_samples]
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue()
        name = f"{split}-{k:05d}.arrow"
        storage.write_bytes(storage.join(out, name), data)
        shards.append(
            {"file": name, "num_samples": len(chunk), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    return shards


def prepare(spec: PrepareSpec, progress: Callable[[str], None] = print) -> dict:
    """Build the dataset described by ``spec``; return its manifest. All or nothing: the output is checked to be
    writable before anything is read; a dataset being replaced loses its manifest first (its shards are about to
    change); every file is written whole (``storage.write_bytes``) and the manifest last; and a failure part-way (a
    full disk, a bad source) removes the shards written so far — no dataset that looks complete, and no debris."""
    fresh = not storage.list_dir(spec.out)
    storage.preflight(spec.out, "data output")
    if storage.exists(storage.join(spec.out, MANIFEST)):
        storage.delete_file(storage.join(spec.out, MANIFEST))
    try:
        return _prepare(spec, progress)
    except BaseException:
        _remove_shards(spec.out, fresh)
        raise


def _remove_shards(out: str, fresh: bool) -> None:
    """The files an unfinished prepare leaves under ``out`` (shards and tokenizer; nothing else is touched), and
    ``out`` itself when this prepare created it (``fresh``) and it is empty again."""
    try:
        for info in storage.list_dir(out):
            if info.base_name == "tokenizer.json" or (info.base_name.endswith(".arrow") and
                                                      info.base_name.startswith(("train-", "val-"))):
                storage.delete_file(storage.join(out, info.base_name))
        if fresh and not storage.list_dir(out) and "://" not in out:
            storage.delete_dir(out)
    except storage.StorageError:
        pass  # the storage that failed the prepare may refuse this too: the first error is the one to report


def _prepare(spec: PrepareSpec, progress: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    files = expand_sources(list(spec.sources))
    progress(f"reading {len(files)} file(s) from {', '.join(storage.redact(s) for s in spec.sources)}")
    if spec.format == "chat":
        return _prepare_chat(spec, files, progress, t0)
    train_text = documents(files, spec.text_field, min(spec.max_bytes or spec.tokenizer_train_bytes,
                                                        spec.tokenizer_train_bytes))
    tok = _tokenizer(spec, train_text)
    progress(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens")
    stream = _encode_stream(tok, documents(files, spec.text_field, spec.max_bytes))
    n_val = int(len(stream) * spec.val_fraction)
    need = (spec.seq_len + 1) * (2 if spec.val_fraction > 0 else 1)
    if len(stream) - n_val < spec.seq_len + 1 or (spec.val_fraction > 0 and n_val < spec.seq_len + 1):
        raise PrepareError(
            f"the corpus gives {len(stream)} tokens, too few for one training and one validation sample of "
            f"seq_len={spec.seq_len} (needs ≥ {need} after the split) — add text, lower data.seq_len, "
            f"or raise data.val_fraction"
        )
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    splits = {}
    for split, part in (("train", stream[: len(stream) - n_val]), ("val", stream[len(stream) - n_val :])):
        samples = _samples(part, spec.seq_len, dtype)
        shards = _write_shards(spec.out, split, {"tokens": samples}, spec.shard_samples)
        splits[split] = {"num_samples": len(samples), "num_tokens": int(len(part)), "shards": shards}
    return _finish(spec, tok, dtype, splits, len(files), {}, progress, t0)


def _tokenizer(spec: PrepareSpec, texts: Iterator[str]) -> Tokenizer:
    """The model's tokenizer when one is given (fine-tuning), else one trained on ``texts``."""
    if spec.base_tokenizer:
        return tokenizer_from_json(spec.base_tokenizer)
    return train_tokenizer(spec.tokenizer, texts, spec.vocab_size)


def _finish(spec: PrepareSpec, tok: Tokenizer, dtype: np.dtype, splits: dict, n_files: int, extra: dict,
            progress: Callable[[str], None], t0: float) -> dict:
    """Tokenizer, then the manifest (last: a dataset without one does not exist)."""
    storage.write_bytes(storage.join(spec.out, "tokenizer.json"), tok.to_json().encode())
    manifest = {
        "format": FORMAT,
        "seq_len": spec.seq_len,
        "dtype": dtype.name,
        "tokenizer": {"file": "tokenizer.json", "kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "sources": [storage.redact(s) for s in spec.sources],
        "num_files": n_files,
        "splits": splits,
        "created_unix": time.time(),
        **extra,
    }
    storage.write_bytes(storage.join(spec.out, MANIFEST), json.dumps(manifest, indent=2).encode())
    progress(
        f"prepared {splits['train']['num_samples']} train / {splits['val']['num_samples']} val samples of "
        f"{spec.seq_len + 1} tokens in {time.perf_counter() - t0:.1f}s → {storage.redact(spec.out)}"
    )
    return manifest


def _prepare_chat(spec: PrepareSpec, files: list[SourceFile], progress: Callable[[str], None], t0: float) -> dict:
    """Conversations in the chat template → rows with ``tokens``, ``roles`` and ``segments`` columns."""
    convs = [c for f in files for c in read_conversations(f)]
    if not convs:
        raise PrepareError(f"no conversations in {', '.join(storage.redact(s) for s in spec.sources)} — see "
                           "data/chat.py for the formats read")
    # A fixed shuffle: files group conversations by topic, so the tail would make a validation set of other topics.
    convs = [convs[i] for i in np.random.default_rng(0).permutation(len(convs))]
    tok = _tokenizer(spec, (text for c in convs for _, text in c)).with_specials(CHAT_TOKENS)
    progress(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens (with chat markers); {len(convs)} conversations")
    n_val = max(1, int(len(convs) * spec.val_fraction)) if spec.val_fraction > 0 else 0
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    splits, truncated, counted = {}, 0, 0
    for split, part in (("train", convs[: len(convs) - n_val]), ("val", convs[len(convs) - n_val :])):
        rows = to_rows([render(tok, c) for c in part], spec.seq_len + 1, tok.eot_id, spec.packing)
        if split == "train" and len(rows.tokens) == 0:
            raise PrepareError("every conversation went to validation — lower data.val_fraction or add data")
        truncated += rows.truncated
        counted += int((rows.roles == REPLY).sum())
        columns = {"tokens": rows.tokens.astype(dtype), "roles": rows.roles, "segments": rows.segments}
        shards = _write_shards(spec.out, split, columns, spec.shard_samples)
        splits[split] = {"num_samples": len(rows.tokens), "num_tokens": int((rows.roles != 0).sum()),
                         "conversations": len(part), "shards": shards}
    if truncated:
        progress(f"note: {truncated} conversation(s) longer than seq_len + 1 = {spec.seq_len + 1} tokens were cut")
    chat = {"packing": spec.packing, "truncated": truncated, "assistant_tokens": counted,
            "template": "<|role|> text <|end|> … <|endoftext|>"}
    return _finish(spec, tok, dtype, splits, len(files), {"columns": list(columns), "chat": chat}, progress, t0)


def spec_for(job, out: str | None = None) -> PrepareSpec:
    """The PrepareSpec of a job's [data] section (written to ``out``, default the job's prepared directory)."""
    d = job.data
    return PrepareSpec(tuple(d.sources), out or job.prepared_dir, d.tokenizer, d.vocab_size, job.seq_len,
                       d.val_fraction, d.text_field, d.max_bytes, d.shard_samples, format=d.format,
                       packing=d.packing)


def prepare_job(job, out: str | None = None, progress: Callable[[str], None] = print) -> dict:
    """Tokenize and shard a job's corpus (``distgpt data prepare``); returns the manifest. A job that starts from
    a trained model (``init.from``) keeps that model's tokenizer."""
    spec = spec_for(job, out)
    if job.init.from_:
        from dataclasses import replace

        from distgpt.checkpoint.layout import model_tokenizer_uri

        base = storage.read_bytes(model_tokenizer_uri(job.init.from_)).decode()
        progress(f"tokenizer: the model's, from {storage.redact(job.init.from_)}")
        spec = replace(spec, base_tokenizer=base)
    return prepare(spec, progress)


def ensure_prepared(job, progress: Callable[[str], None] = print) -> dict:
    """The manifest of the job's prepared dataset, preparing it first when none exists (or its seq_len differs)."""
    uri = job.prepared_dir
    if storage.exists(storage.join(uri, MANIFEST)):
        try:
            manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
        except ValueError:
            manifest = None
        if isinstance(manifest, dict) and manifest.get("seq_len") == job.seq_len:
            return manifest
        why = (f"has seq_len {manifest.get('seq_len')}, job wants {job.seq_len}" if isinstance(manifest, dict)
               else f"has an unreadable {MANIFEST}")
        progress(f"prepared data at {storage.redact(uri)} {why}: re-preparing")
    return prepare_job(job, progress=progress)
