"""Activation recomputation (checkpointing) applied from outside the model."""

from __future__ import annotations

from torch import nn


def apply_recompute(model: nn.Module) -> None:
    """Activation recomputation per block: keep each block's input, recompute its internals in backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
