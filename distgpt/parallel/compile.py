"""Regional compilation applied from outside the model: ``torch.compile`` on each transformer block.

As torchtitan does it: after tensor parallelism and recomputation (so the compiled region is the block as it runs,
its checkpoint included), before data parallelism wraps the model (DDP and FSDP2 hooks stay outside the compiled
code). The blocks share one code object, so the compiler works once for all of them, not once per layer; the
state dict keeps its names (``nn.Module.compile`` compiles in place, unlike a ``torch.compile(module)`` wrapper).
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compile every block of ``model`` in place."""
    for block in model.layers.values():
        block.compile()
