"""Finding and reading the documents of a corpus: .txt (and other plain text), .jsonl, .parquet; local or remote.

``builtin:python-stdlib`` names the Python standard library's own source files: a real corpus that every machine
with Python has, so the README's demo downloads nothing.
"""

from __future__ import annotations

import json
import posixpath
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distgpt.errors import DistgptError
from distgpt.storage import StorageError, redact, resolve

BUILTIN_STDLIB = "builtin:python-stdlib"
PLAIN_TEXT = (".txt", ".md", ".rst", ".py", ".text")
STRUCTURED = (".jsonl", ".parquet")
# Vendored packages and test data are not "the standard library's own source", and lib2to3/test hold odd encodings.
_STDLIB_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "__pycache__",
    "encodings", "pydoc_data",  # code-page tables and a docs dump: data, not code
}


class SourceError(DistgptError, ValueError):
    """An input file cannot be read as the job says; the message names the file and the fix."""


class SourceWarning(UserWarning):
    """An input file was read with a repair (invalid UTF-8 replaced); the message counts what was replaced."""


@dataclass(frozen=True)
class SourceFile:
    """One input file and the filesystem it lives on."""

    fs: pafs.FileSystem
    path: str
    label: str  # printable (credential-free) name

    @property
    def kind(self) -> str:
        """'jsonl', 'parquet' or 'text', from the file name."""
        for ext in STRUCTURED:
            if self.path.endswith(ext):
                return ext[1:]
        return "text"


def _stdlib_files() -> list[SourceFile]:
    root = sysconfig.get_paths()["stdlib"]
    fs = pafs.LocalFileSystem()
    sel = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = []
    for info in sel:
        rel = posixpath.relpath(info.path, root)
        if info.type != pafs.FileType.File or not rel.endswith(".py"):
            continue
        if _STDLIB_SKIP.intersection(rel.split("/")[:-1]):
            continue
        files.append(SourceFile(fs, info.path, f"stdlib/{rel}"))
    return sorted(files, key=lambda f: f.path)


def expand_sources(sources: list[str]) -> list[SourceFile]:
    """Every input file named by ``sources`` (files, directories searched recursively, URIs, the builtin corpus),
    in a deterministic order. Raises StorageError naming a source that does not exist or holds no usable file."""
    out: list[SourceFile] = []
    for src in sources:
        if src == BUILTIN_STDLIB:
            out.extend(_stdlib_files())
            continue
        if src == "builtin:arithmetic":  # addition problems with their answers (distgpt.rl.tasks)
            from distgpt.rl.tasks import arithmetic_text_file

            path = arithmetic_text_file()
            out.append(SourceFile(pafs.LocalFileSystem(), path, "builtin:arithmetic"))
            continue
        if src.startswith("builtin:chatterbot/"):
            from distgpt.data.chat import chatterbot_files  # imported here: chat.py builds on this module

            out.extend(chatterbot_files(src))
            continue
        fs, path = resolve(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            out.append(SourceFile(fs, path, redact(src)))
        elif info.type == pafs.FileType.Directory:
            found = [
                SourceFile(fs, i.path, i.path)
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and i.path.endswith(PLAIN_TEXT + STRUCTURED)
            ]
            if not found:
                raise StorageError(
                    f"data source {redact(src)} is a directory with no .txt/.md/.py/.jsonl/.parquet files"
                )
            out.extend(sorted(found, key=lambda f: f.path))
        else:
            raise StorageError(
                f"data source {redact(src)} does not exist — check the path, or use {BUILTIN_STDLIB!r} "
                f"for the built-in corpus"
            )
    return out


def read_documents(f: SourceFile, text_field: str) -> Iterator[str]:
    """The documents of one file: the whole file for plain text, one per line / row for jsonl / parquet."""
    if f.kind == "parquet":
        table = pq.read_table(f.path, columns=[text_field], filesystem=f.fs) if _has_column(f, text_field) else None
        if table is None:
            raise SourceError(f"{f.label}: no column {text_field!r} — set data.text_field to the text column")
        yield from (t for t in table.column(text_field).to_pylist() if t)
        return
    if f.path.endswith((".yml", ".yaml")) and f.label.startswith("chatterbot/"):
        from distgpt.data.chat import read_conversations  # its dialogues as text: each one a document

        yield from ("\n".join(text for _, text in conv) for conv in read_conversations(f))
        return
    text = _read_text(f)
    if f.kind == "text":
        if text:
            yield text
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(
                f"{f.label}:{n}: not a JSON object with a {text_field!r} field ({type(e).__name__}) — "
                f"fix the line or set data.text_field"
            ) from None
        if doc:
            yield str(doc)


MAX_INVALID = 0.001
"""Share of a file's bytes that may be invalid UTF-8 (each becomes U+FFFD, counted in a warning): a stray bad byte
should not sink a corpus, but a binary file is not text."""


def _read_text(f: SourceFile) -> str:
    """The file decoded as UTF-8; SourceError naming it when it cannot be read or is not text."""
    try:
        with f.fs.open_input_stream(f.path) as stream:
            raw = stream.read()
    except OSError as e:
        raise SourceError(f"{f.label}: cannot be read ({e.strerror or e}) — fix it or remove it from "
                          "data.sources") from None
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())  # replacements made, not U+FFFD already there
    nul = b"\0" in raw
    if nul or bad > MAX_INVALID * max(len(raw), 1):
        raise SourceError(f"{f.label}: not UTF-8 text ({bad} invalid byte sequence(s) in {len(raw)} bytes"
                          f"{', NUL bytes' if nul else ''}) — convert it to UTF-8, or remove it from data.sources")
    if bad:
        warnings.warn(f"{f.label}: {bad} invalid UTF-8 byte sequence(s) replaced with U+FFFD", SourceWarning,
                      stacklevel=3)
    return text


def _has_column(f: SourceFile, name: str) -> bool:
    return name in pq.read_schema(f.path, filesystem=f.fs).names
