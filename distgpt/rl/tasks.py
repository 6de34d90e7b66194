"""Verifiable tasks: prompts whose answers a program checks exactly, so a reward needs no model.

``builtin:arithmetic`` is addition of two numbers below 20, written ``a+b=`` and answered ``c`` then a newline — small
enough that a sub-million-parameter model learns part of it in a CPU-minute, so reinforcement learning has something
to sharpen (with operands below 100, 1,500 pre-training steps of that model stayed at 2% held-out accuracy). Its 400
problems are split once, by a fixed permutation, into a held-out set (the first ``HELD_OUT``) and the rest; the
pre-training text (``builtin:arithmetic`` as a ``[data]`` source) holds only training problems, so held-out accuracy
measures what was learnt (the structure of addition), not what was memorised. A prompt set may also be a file:
``.jsonl`` objects with a ``prompt`` field, or ``.txt`` with one prompt per line.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np

from distgpt import storage
from distgpt.errors import DistgptError

ARITHMETIC = "builtin:arithmetic"
LIMIT = 20
"""Operands are 0 .. LIMIT-1."""
HELD_OUT = 80
"""Problems kept out of pre-training and RL prompts: the held-out evaluation set."""
PASSES = 30
"""Times the pre-training text goes over the training problems."""
"""Problems kept out of pre-training and RL prompts: the held-out evaluation set."""
_PROBLEM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


class TaskError(DistgptError, ValueError):
    """A prompt set that cannot be read, or a reward that cannot be loaded or misbehaves."""


def arithmetic_problems(split: str) -> list[tuple[int, int]]:
    """(a, b) pairs of one split ('train' or 'held_out'), in a fixed order."""
    pairs = [(a, b) for a in range(LIMIT) for b in range(LIMIT)]
    order = np.random.default_rng(20261202).permutation(len(pairs))
    chosen = order[:HELD_OUT] if split == "held_out" else order[HELD_OUT:]
    return [pairs[i] for i in chosen]


def arithmetic_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def arithmetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when a completion is exactly the sum (digits up to the first newline, nothing else), else 0.0."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        m = _PROBLEM.match(prompt)
        if m is None:
            raise TaskError(f"arithmetic_reward: {prompt!r} is not an 'a+b=' prompt — use this reward with "
                            f"rl.prompts = {ARITHMETIC!r}")
        answer = completion.split("\n", 1)[0].strip()
        out.append(1.0 if answer == str(int(m[1]) + int(m[2])) else 0.0)
    return out


def arithmetic_text_file() -> str:
    """A text file of the training problems with their answers, one per line, ``PASSES`` times over in fixed shuffled
    orders (written once to the temp directory): the pre-training corpus ``builtin:arithmetic`` names. Several
    passes, because one is a few dozen training samples: the model would see the same windows every epoch."""
    path = os.path.join(tempfile.gettempdir(), "distgpt-builtin", f"arithmetic-train-v2-{LIMIT}.txt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        train, rng = arithmetic_problems("train"), np.random.default_rng(7)
        lines = "".join(f"{arithmetic_prompt(*train[i])}{sum(train[i])}\n"
                        for _ in range(PASSES) for i in rng.permutation(len(train)))
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(lines)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


def load_prompts(source: str, split: str) -> list[str]:
    """The prompts of ``source`` for ``split`` ('train' or 'held_out'). A file's held-out prompts are the ones its
    ``split`` field (jsonl) marks 'held_out'; a file without them has none (evaluation is then skipped)."""
    if source == ARITHMETIC:
        return [arithmetic_prompt(a, b) for a, b in arithmetic_problems(split)]
    try:
        text = storage.read_bytes(source).decode("utf-8")
    except Exception as e:  # a StorageError or an OSError: either way the fix is the path
        raise TaskError(f"rl.prompts: cannot read {storage.redact(source)} ({e}) — name a .jsonl/.txt file or "
                        f"{ARITHMETIC!r}") from None
    if source.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((str(obj["prompt"]), obj.get("split", "train")))
            except (ValueError, KeyError, TypeError):
                raise TaskError(f"rl.prompts: {storage.redact(source)}:{n} is not a JSON object with a 'prompt' "
                                f"field") from None
        prompts = [p for p, s in rows if s == split]
    else:
        prompts = [line for line in text.splitlines() if line.strip()] if split == "train" else []
    if split == "train" and not prompts:
        raise TaskError(f"rl.prompts: {storage.redact(source)} holds no training prompts")
    return prompts
