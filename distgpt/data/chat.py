"""Conversations → token rows for supervised fine-tuning: the chat template, role codes, packing.

Template (role markers are special tokens appended to the tokenizer, ``tokenizer.CHAT_TOKENS``)::

    <|system|> text <|end|>  <|user|> text <|end|>  <|assistant|> text <|end|>  …  <|endoftext|>

Every token gets a role code: 0 padding, 1 prompt (markers, system and user text, the closing end-of-text), 2
assistant (its text and its ``<|end|>``, so the model learns to stop). The SFT objective counts targets by code.

Rows hold ``seq_len + 1`` tokens. Unpacked: one conversation per row, padded. Packed: conversations follow each other
in a row, each with its own segment id (1, 2, …; 0 is padding); the model then attends only within a segment and
restarts positions at each one, so a packed row computes exactly what its conversations would alone. A conversation
longer than a row is cut at the row's end (counted in the manifest).

Sources: ``.jsonl`` lines with ``messages`` (a list of {role, content}) or ``prompt`` / ``response``; ``.parquet``
with the same columns; ``builtin:chatterbot/<language>`` — the dialogues of the ``chatterbot-corpus`` package
(alternating user / assistant turns; English, Chinese and 26 more languages), installed with distgpt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from distgpt.data.sources import SourceError, SourceFile
from distgpt.data.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

PAD, PROMPT, REPLY = 0, 1, 2
"""Role codes of tokens (the ``roles`` column)."""
CHATTERBOT = "builtin:chatterbot/"
MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Conversation = list[tuple[str, str]]
"""(role, text) turns; role is 'system', 'user' or 'assistant'."""


def chatterbot_files(source: str) -> list[SourceFile]:
    """The YAML files of one chatterbot-corpus language, e.g. ``builtin:chatterbot/english``."""
    import os

    import pyarrow.fs as pafs

    language = source[len(CHATTERBOT):]
    try:
        import chatterbot_corpus
    except ImportError:
        raise SourceError(f"{source}: the chatterbot-corpus package is not installed — pip install "
                          "chatterbot-corpus") from None
    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")
    folder = os.path.join(root, language)
    if not language or not os.path.isdir(folder):
        known = ", ".join(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
        raise SourceError(f"{source}: no such chatterbot-corpus language — choose one of {known}")
    fs = pafs.LocalFileSystem()
    return [SourceFile(fs, os.path.join(folder, n), f"chatterbot/{language}/{n}")
            for n in sorted(os.listdir(folder)) if n.endswith((".yml", ".yaml"))]


def read_conversations(f: SourceFile) -> Iterator[Conversation]:
    """The conversations of one file (YAML dialogues, JSONL lines or Parquet rows)."""
    if f.path.endswith((".yml", ".yaml")):
        yield from _yaml_dialogues(f)
    elif f.kind == "parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(f.path, filesystem=f.fs).to_pylist(), start=1):
            yield _conversation(row, f"{f.label} row {n}")
    elif f.kind == "jsonl":
        with f.fs.open_input_stream(f.path) as stream:
            lines = stream.read().decode("utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{f.label}:{n}: not JSON ({e.msg}) — one conversation object per line"
                                      ) from None
                yield _conversation(row, f"{f.label}:{n}")
    else:
        raise SourceError(f"{f.label}: conversations come as .jsonl, .parquet or chatterbot YAML, not plain text — "
                          "use data.format = 'text' for plain text")


def _yaml_dialogues(f: SourceFile) -> Iterator[Conversation]:
    import yaml

    with f.fs.open_input_stream(f.path) as stream:
        data = yaml.safe_load(stream.read().decode("utf-8")) or {}
    for dialogue in data.get("conversations", []):
        turns = [str(t) for t in dialogue if t is not None and str(t).strip()]
        if len(turns) >= 2:
            yield [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


def _conversation(row: object, where: str) -> Conversation:
    """A JSONL object or Parquet row as turns; one clear error for anything else."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        turns = []
        for m in row["messages"]:
            role = m.get("role") if isinstance(m, dict) else None
            if role not in MARKERS or not isinstance(m.get("content"), str):
                raise SourceError(f"{where}: each message needs role system|user|assistant and text content, "
                                  f"got {m!r}")
            turns.append((role, m["content"]))
        return turns
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return [("user", row["prompt"]), ("assistant", row["response"])]
    raise SourceError(f"{where}: expected a 'messages' list of {{role, content}} or 'prompt' and 'response' text")


def render(tok: Tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """(token ids, role codes) of one conversation in the chat template."""
    end = _special(tok, END)
    ids: list[int] = []
    roles: list[int] = []
    for role, text in conversation:
        body = tok.encode(text)
        code = REPLY if role == "assistant" else PROMPT
        ids += [_special(tok, MARKERS[role]), *body, end]
        roles += [PROMPT] + [code] * (len(body) + 1)
    return ids + [tok.eot_id], roles + [PROMPT]


def _special(tok: Tokenizer, token: str) -> int:
    i = tok.special_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token} token: build it with tokenizer.with_specials(CHAT_TOKENS)")
    return i


def chat_prompt(tok: Tokenizer, conversation: Conversation) -> list[int] | None:
    """The ids that ask a chat-tuned model for the assistant's next turn after ``conversation`` (None when the
    tokenizer has no chat markers: the model was not tuned on the template)."""
    if tok.special_id(ASSISTANT) is None:
        return None
    ids = render(tok, conversation)[0][:-1] if conversation else []  # without the closing end-of-text
    return ids + [_special(tok, ASSISTANT)]


def stop_ids(tok: Tokenizer) -> set[int]:
    """Tokens that end an assistant's turn."""
    return {i for i in (tok.special_id(END), tok.eot_id) if i is not None}


@dataclass
class Rows:
    """Fixed-width rows and what they hold."""

    tokens: np.ndarray
    roles: np.ndarray
    segments: np.ndarray
    truncated: int
    """Conversations cut at the end of a row."""


def to_rows(rendered: list[tuple[list[int], list[int]]], width: int, pad_id: int, packing: bool) -> Rows:
    """Lay rendered conversations into rows of ``width`` tokens: one per row (padded), or packed in order."""
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (tokens, roles, segment ids) of each row
    truncated = 0
    for ids, roles in rendered:
        if len(ids) > width:
            ids, roles, truncated = ids[:width], roles[:width], truncated + 1
        if not rows or not packing or len(rows[-1][0]) + len(ids) > width:
            rows.append(([], [], []))
        tokens, codes, segments = rows[-1]
        seg = segments[-1] + 1 if segments else 1
        tokens += ids
        codes += roles
        segments += [seg] * len(ids)
    out = Rows(np.full((len(rows), width), pad_id, dtype=np.int64), np.zeros((len(rows), width), dtype=np.uint8),
               np.zeros((len(rows), width), dtype=np.int32), truncated)
    for i, (tokens, codes, segments) in enumerate(rows):
        out.tokens[i, : len(tokens)], out.roles[i, : len(codes)], out.segments[i, : len(segments)] = \
            tokens, codes, segments
    return out
