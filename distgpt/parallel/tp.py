"""Megatron-style tensor parallelism with DTensor ``parallelize_module`` plans.

Per block, with t tensor-parallel ranks:
  * q/k/v projections and MLP fc1 are split by output columns (``ColwiseParallel``): each rank computes n_head/t whole
    heads and 1/t of the MLP hidden units. Forward: no communication (input replicated). Backward: all-reduce of the
    input gradient.
  * attention o_proj and MLP fc2 are split by input rows (``RowwiseParallel``): each rank multiplies its slice and the
    partial sums are all-reduced in forward; backward needs no communication.
  So each block costs two all-reduces of (B, T, C) in forward and two in backward, as in Megatron-LM.
* The token embedding is split by vocabulary rows (``RowwiseParallel`` on ``nn.Embedding``): ids outside a rank's
  range give zeros and one all-reduce assembles the embeddings.
* The LM head is split by vocabulary (``ColwiseParallel``) and its logits stay sharded (``Shard(-1)``); the loss is
  computed under ``loss_parallel``, which reduces max / sum-exp / target logit across ranks — the full-vocabulary
  logits are never gathered.
LayerNorms, biases of row-split layers, and the position table stay replicated: their inputs are identical on every
tensor-parallel rank, so their gradients are too.
"""

from __future__ import annotations

import contextlib

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from distgpt.model.gpt import GPT


def apply_tp(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Shard ``model`` (or the part a pipeline stage holds) in place over ``tp_mesh``."""
    head_tied = model.cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None
    if model.tok_emb is not None:
        parallelize_module(model.tok_emb, tp_mesh, RowwiseParallel(input_layouts=Replicate(),
                                                                   output_layouts=Replicate()))
    if model.lm_head is not None:
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(),
            "mlp.fc2": RowwiseParallel(),
        })
    if head_tied:
        # Both weights are (V, C) sharded on dim 0 over the same mesh, so one DTensor serves both roles again.
        model.lm_head.weight = model.tok_emb.weight


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """The context the loss's forward *and* backward must run in: vocabulary-parallel cross-entropy under TP."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
