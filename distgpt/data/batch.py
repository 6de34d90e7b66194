"""A batch as the engines see it: rows of token inputs and targets, an optional loss mask and weights, and any
columns an objective adds. What each field means for the loss is the objective's business
(``train/objectives/base.py``); the engines only slice rows and move them to the device."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """One rank's rows of a global batch. Every tensor has the rows as its first dimension."""

    inputs: torch.Tensor
    """(B, T) token ids fed to the model."""
    targets: torch.Tensor
    """(B, T) the token each position should predict."""
    loss_mask: torch.Tensor | None = None
    """(B, T) bool: which positions count (None: all)."""
    weights: torch.Tensor | None = None
    """(B, T) float: how much each position counts (None: 1)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Objective-specific columns, e.g. old log-probabilities or advantages."""

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, index: slice | torch.Tensor) -> Batch:
        """The rows ``index`` selects (a slice, or a tensor of row numbers)."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, fn) -> Batch:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        out = {k: None if v is None else fn(v) for k, v in out.items()}
        return Batch(**out, extras={k: fn(v) for k, v in self.extras.items()})
