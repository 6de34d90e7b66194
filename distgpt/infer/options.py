"""The options of ``distgpt serve`` and the errors of inference, importable without torch (``distgpt --help`` and
the CLI's argument checks load neither)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from distgpt.errors import DistgptError


class InferError(DistgptError):
    """A model cannot be prepared for inference (no compiler, bad option); the message says what to do."""


@dataclass(frozen=True)
class ServeSpec:
    """What a served copy needs (sent as is to every Ray Serve replica). ``None`` limits take the model's defaults:
    prompts up to its context − 1, answers up to its context, 4 × the cache slots running or waiting."""

    model: str
    engine: str | None = None
    device: str = "cpu"
    max_batch: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_concurrent: int | None = None
    name: str = ""

    def concurrent(self, slots: int) -> int:
        """Requests running or waiting that one copy accepts: ``max_concurrent``, else 4 × its cache slots."""
        return self.max_concurrent or 4 * slots

    @property
    def model_id(self) -> str:
        """The model's id in the API: ``name``, else the directory's name."""
        return self.name or self.model.rstrip("/").rsplit("/", 1)[-1]

    def problems(self) -> list[str]:
        """Options that cannot work, each naming its flag."""
        return [f"--{k.replace('_', '-')} must be positive, got {v}" for k, v in
                (("max_batch", self.max_batch), ("max_prompt_tokens", self.max_prompt_tokens),
                 ("max_new_tokens", self.max_new_tokens), ("max_concurrent", self.max_concurrent))
                if v is not None and v < 1]


def needs_compiler(engine: str) -> None:
    """torch.compile on CPU builds C++; without a compiler say so once instead of a deep traceback."""
    if engine == "compiled" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise InferError("the compiled engine needs a C++ compiler on this machine (torch.compile builds C++ "
                         "kernels on CPU) — install g++ or use --engine eager")
