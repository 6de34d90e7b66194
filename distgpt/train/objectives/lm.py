"""``lm``: next-token prediction on every position (pre-training)."""

from __future__ import annotations

import torch

from distgpt.train.objectives.base import Batch, Objective, token_cross_entropy


class NextToken(Objective):
    """Mean next-token cross-entropy over every position of the global batch."""

    name = "lm"

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return token_cross_entropy(logits, batch.targets, reduction="sum")  # no mask, no weights: sum directly


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions (for hand-written reference loops and tests)."""
    return token_cross_entropy(logits, targets, reduction="mean")
