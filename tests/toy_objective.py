"""A toy objective for tests, plugged in as ``--objective.kind=tests.toy_objective:WeightedMasked``.

Per-token weights and a loss mask, both functions of the target token, so the number of counted positions differs
between micro-batches and replicas: an engine that averaged per micro-batch (or per replica), or that computed
next-token cross-entropy itself, would not match one process.
"""

from __future__ import annotations

import torch

from distgpt.data.batch import Batch
from distgpt.train.objectives.base import Objective


class WeightedMasked(Objective):
    """Cross-entropy on targets not divisible by 3, weighted 1 + (target mod 5) / 4."""

    name = "toy-weighted-masked"

    def make_batch(self, columns: dict[str, torch.Tensor]) -> Batch:
        tokens = columns["tokens"]
        targets = tokens[:, 1:]
        return Batch(tokens[:, :-1], targets, loss_mask=targets % 3 != 0, weights=1.0 + (targets % 5).float() / 4)
