"""Data preparation and loading through pyarrow.fs against a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from distgpt.data.loader import TokenDataset, load_tokenizer
from distgpt.data.prepare import PrepareSpec, prepare
from distgpt.storage import StorageError, redact

from ..conftest import moto_s3


@pytest.fixture(scope="module")
def s3():
    """(port, filesystem) of a moto S3 server bound to loopback, with a bucket 'corpus'."""
    with moto_s3("corpus") as server:
        yield server


def test_prepare_reads_and_writes_s3(s3):
    port, fs = s3
    q = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    with fs.open_output_stream("corpus/in/docs.jsonl") as f:
        f.write("".join(json.dumps({"text": f"document {i}: to be or not to be. "}) + "\n"
                        for i in range(200)).encode())
    out = f"s3://corpus/prepared{q}"
    m = prepare(PrepareSpec((f"s3://corpus/in/docs.jsonl{q}",), out, "byte", 0, 32, 0.1), progress=lambda s: None)
    assert m["sources"] == ["s3://corpus/in/docs.jsonl"]  # no query string (credentials could live there)
    assert fs.get_file_info("corpus/prepared/manifest.json").type == pafs.FileType.File
    ds = TokenDataset(out, "train")
    assert len(ds) == m["splits"]["train"]["num_samples"] > 0
    assert load_tokenizer(out).decode(ds.samples[0].tolist())[:11] == "document 0:"


def test_missing_object_is_a_clear_error(s3):
    port, _ = s3
    q = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    with pytest.raises(StorageError, match="s3://no-such-bucket/x.txt does not exist"):
        prepare(PrepareSpec((f"s3://no-such-bucket/x.txt{q}",), "/tmp/unused", "byte"), progress=lambda s: None)
    assert redact(f"s3://b/p{q}&secret_key=abc") == "s3://b/p"
