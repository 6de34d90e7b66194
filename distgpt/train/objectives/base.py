"""What an objective is: the batch it trains on and the loss of a model's output on that batch.

Every objective is normalised over the *global* batch. With a per-token loss ℓ, a loss mask m (which tokens count)
and weights w (how much each counts), the loss of one optimizer step is

    L = Σ_{r, t} m_t · w_t · ℓ_t  /  Σ_{r, t} m_t          (r: data-parallel replicas, t: their tokens)

An objective supplies the numerator of any piece of a batch (``loss``: a micro-batch, on a pipeline's last stage)
and the denominator of a rank's share (``normaliser``); the engines sum the denominators over data-parallel ranks
once per step and scale each piece by it (``parallel/engine.py``). So packing, masking or uneven batch shares never
change what is minimised, and every Plan computes the same L as one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from distgpt.data.batch import Batch


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Next-token cross-entropy per position (B, T), or summed, in fp32 for stability under bf16 autocast.

    Under tensor parallelism the logits are vocabulary-sharded and the engine runs this inside ``loss_parallel``,
    which returns a replicated DTensor; its local value is the full loss and autograd flows through ``to_local``."""
    out = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    out = out.to_local() if isinstance(out, DTensor) else out
    return out.view(targets.shape) if reduction == "none" else out


class Objective:
    """Base class: override ``make_batch`` for what a batch holds and ``token_losses`` for the per-token loss ℓ;
    ``loss`` and ``normaliser`` then follow the formula in the module docstring."""

    name = "objective"

    def __init__(self, settings=None):
        """``settings``: the job's ``[objective]`` section (objectives read the keys that are theirs)."""
        self.settings = settings

    def check_data(self, manifest: dict) -> None:
        """Refuse a prepared dataset this objective cannot train on (the manifest says what it holds)."""

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keyword inputs the model needs besides the tokens (e.g. packed ``segments``); none by default."""
        return {}

    def make_batch(self, columns: dict[str, torch.Tensor]) -> Batch:
        """A batch from a loader's columns; ``columns['tokens']`` is (B, T + 1): inputs and shifted targets."""
        tokens = columns["tokens"]
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def token_losses(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """ℓ for every position, (B, T)."""
        return token_cross_entropy(logits, batch.targets)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Σ m·w·ℓ over the rows of ``batch`` (a 0-d tensor; the engine scales it by the global normaliser)."""
        ell = self.token_losses(logits, batch)
        if batch.weights is not None:
            ell = ell * batch.weights
        if batch.loss_mask is not None:
            ell = ell * batch.loss_mask
        return ell.sum()

    def normaliser(self, batch: Batch) -> torch.Tensor:
        """Σ m over the rows of ``batch`` (float, 0-d): how many positions count."""
        if batch.loss_mask is None:
            return torch.tensor(float(batch.targets.numel()))
        return batch.loss_mask.sum().float()

    def known_normaliser(self, batch: Batch, global_rows: int) -> float | None:
        """D of the whole global batch when one rank can know it alone — no mask, so every target of every row
        counts — which spares the step's all-reduce of D before the backward pass; None when it must be summed."""
        if batch.loss_mask is None and type(self).normaliser is Objective.normaliser:
            return float(global_rows * batch.targets.shape[1])
        return None
