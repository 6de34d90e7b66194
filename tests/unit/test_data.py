"""Data preparation (txt / jsonl / parquet, local and file:// URIs) and the deterministic, resumable loader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distgpt.data.loader import DataLoader, DatasetError, TokenDataset, read_manifest, sample_ids
from distgpt.data.prepare import PrepareError, PrepareSpec, prepare
from distgpt.data.sources import SourceError
from distgpt.storage import StorageError

TEXT = "It was the best of times, it was the worst of times. 春眠不觉晓，处处闻啼鸟。\n" * 40


def quiet(spec: PrepareSpec) -> dict:
    return prepare(spec, progress=lambda s: None)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"document {i}: " + TEXT[: 50 + i], "id": i}) + "\n")
    pq.write_table(pa.table({"text": [f"row {i} " * 30 for i in range(20)]}), tmp_path / "c.parquet")
    return tmp_path


def test_prepare_all_formats_and_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    m = quiet(PrepareSpec((str(corpus / "a.txt"), str(corpus / "b.jsonl"), str(corpus / "c.parquet")), str(out),
                          "byte", 0, 32, 0.1, shard_samples=50))
    assert m == read_manifest(str(out))
    expected_tokens = len(TEXT.encode()) + 1  # + end-of-text
    expected_tokens += sum(len((f"document {i}: " + TEXT[: 50 + i]).encode()) + 1 for i in range(30))
    expected_tokens += sum(len((f"row {i} " * 30).encode()) + 1 for i in range(20))
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["num_tokens"] + val["num_tokens"] == expected_tokens
    assert val["num_tokens"] == int(expected_tokens * 0.1)
    assert train["num_samples"] == (train["num_tokens"] - 1) // 32
    assert len(train["shards"]) == -(-train["num_samples"] // 50)
    for shard in train["shards"] + val["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    ds = TokenDataset(str(out), "train")
    assert len(ds) == train["num_samples"]
    # Consecutive samples share their boundary token: every token is a target exactly once.
    assert (ds.samples[1:, 0] == ds.samples[:-1, -1]).all()
    assert bytes(ds.samples[0, :20].tolist()) == TEXT.encode()[:20]


def test_prepare_directory_via_file_uri_with_bpe(corpus, tmp_path):
    out = f"file://{tmp_path}/uri-out"
    m = quiet(PrepareSpec((f"file://{corpus}",), out, "bpe", 300, 16, 0.05))
    assert m["tokenizer"]["kind"] == "bpe" and m["num_files"] == 3
    assert len(TokenDataset(out, "val")) == m["splits"]["val"]["num_samples"] > 0


def test_prepare_errors_are_clear(corpus, tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        quiet(PrepareSpec((str(tmp_path / "nope.txt"),), str(tmp_path / "o1"), "byte"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2"):
        quiet(PrepareSpec((str(tmp_path / "bad.jsonl"),), str(tmp_path / "o2"), "byte"))
    with pytest.raises(PrepareError, match="too few"):
        quiet(PrepareSpec((str(corpus / "a.txt"),), str(tmp_path / "o3"), "byte", seq_len=100_000))
    assert not (tmp_path / "o3" / "manifest.json").exists()  # nothing that looks like a dataset
    with pytest.raises(DatasetError, match="distgpt data prepare"):
        TokenDataset(str(tmp_path / "o3"))


def test_order_is_a_pure_function_and_each_epoch_a_permutation():
    a = sample_ids(100, seed=7, start=0, count=300)
    assert (a == sample_ids(100, seed=7, start=0, count=300)).all()
    assert not (a == sample_ids(100, seed=8, start=0, count=300)).all()
    for e in range(3):
        assert sorted(a[e * 100 : (e + 1) * 100]) == list(range(100))
    assert not (a[:100] == a[100:200]).all()  # epochs are shuffled differently
    assert (a[150:170] == sample_ids(100, 7, 150, 20)).all()  # random access agrees with sequential


def _run(ds, shares, seed, steps, state=None):
    """Ids consumed per step by all ranks, in global order; and the final state of rank 0."""
    loaders = [DataLoader(ds, sum(shares), seed, r, shares) for r in range(len(shares))]
    for ld in loaders:
        if state:
            ld.load_state_dict(state)
    steps_ids = [np.concatenate([ld.next_ids() for ld in loaders]) for _ in range(steps)]
    return np.concatenate(steps_ids), loaders[0].state_dict()


def test_resume_at_another_dp_size_neither_repeats_nor_skips(tiny_data):
    ds = TokenDataset(tiny_data, "train")
    reference, _ = _run(ds, [16], seed=3, steps=12)
    first, state = _run(ds, [4, 4, 4, 4], seed=3, steps=5)  # dp=4
    second, state = _run(ds, [8, 8], seed=3, steps=4, state=state)  # resumed at dp=2
    third, _ = _run(ds, [12, 4], seed=3, steps=3, state=state)  # resumed with uneven shares 3:1
    resumed = np.concatenate([first, second, third])
    assert (resumed == reference).all()
    assert len(set(resumed.tolist())) == len(resumed)  # within the first epoch: no sample twice


def test_loader_batches_are_inputs_and_shifted_targets(tiny_data):
    ds = TokenDataset(tiny_data, "train")
    x, y = DataLoader(ds, 4, seed=0).next_batch()
    assert x.shape == y.shape == (4, 64)
    assert (x[:, 1:] == y[:, :-1]).all()
