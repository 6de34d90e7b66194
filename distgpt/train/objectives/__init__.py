"""Training objectives, by name. An objective is one small piece: what a batch holds and its loss (``base.py``);
the engines shard, step and reduce, and never name a loss.

This module imports no torch, so job validation (``distgpt config``) can check a name without loading one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distgpt.train.objectives.base import Objective

NAMES = {"lm": "distgpt.train.objectives.lm:NextToken", "sft": "distgpt.train.objectives.sft:SupervisedChat",
         "pg": "distgpt.train.objectives.pg:PolicyGradient"}
"""Built-in objectives: ``[objective] kind`` → 'module:class'."""


def resolve(kind: str, settings=None) -> Objective:
    """An instance of the objective ``kind``: a name in ``NAMES`` or 'package.module:Class' (your own), given the
    job's ``[objective]`` section."""
    from distgpt.config_schema import ConfigError
    from distgpt.train.objectives.base import Objective

    target = NAMES.get(kind, kind)
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError([f"objective.kind: cannot load {kind!r} ({type(e).__name__}: {e}) — use one of "
                           f"{', '.join(NAMES)}, or 'package.module:Class' importable on every rank"],
                          "[objective]") from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError([f"objective.kind: {kind!r} is not a subclass of distgpt.train.objectives.base.Objective"],
                          "[objective]")
    return cls(settings)
