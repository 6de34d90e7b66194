"""Canonical parameter names: the names a one-process GPT gives its parameters, whatever the Plan.

Checkpoints store state under these names, which is what lets one saved under one Plan load into another. Three
things would otherwise make names differ between Plans, and this module owns each of them:

* wrappers (DDP's ``module.``, FSDP2 / TP DTensors) — ``get_state_dict`` strips them and keeps DTensor shards;
* a tied LM head: one Parameter in one process; on a pipeline's last stage (which has no embedding) the head holds
  its own copy. Its optimizer state is stored as the embedding's (``tok_emb.weight``), where every Plan finds it;
* an interleaved pipeline rank holds several model chunks; they are seen as one model (``WholeModel``) whose blocks
  keep their global layer index and whose ends (embedding, norm, head) appear once.

Optimizer state is keyed by parameter name, not position (``flatten_optimizer_state_dict``, as torchtitan), so it
reshards across pipeline stages too. DeepSpeed's ZeRO partitions get the same names in ``ds_state.py``.
"""

from __future__ import annotations

from torch import nn

HEAD, EMB = "lm_head.weight.", "tok_emb.weight."
ENDS = ("tok_emb", "pos_emb", "norm", "lm_head")
"""The model's optional first/last-stage modules (``GPT``: any may be None on a pipeline stage)."""


def unwrap(m: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 and TP wrap in place)."""
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


class WholeModel(nn.Module):
    """The model chunks one rank holds under an interleaved pipeline, seen as one model. The chunks' modules are
    shared, not copied: the optimizer's parameters are this container's."""

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        roots = [unwrap(c) for c in chunks]
        self.cfg = roots[0].cfg
        self.layers = nn.ModuleDict({k: v for r in roots for k, v in r.layers.items()})
        for name in ENDS:
            setattr(self, name, next((getattr(r, name) for r in roots if getattr(r, name, None) is not None), None))


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _target(modules: list[nn.Module]) -> nn.Module:
    return modules[0] if len(modules) == 1 else WholeModel(modules)


def holds_head_copy(model: nn.Module) -> bool:
    """A pipeline's last stage holding a tied head without the embedding: its state is the embedding's."""
    return (getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
            and getattr(model, "tok_emb", 1) is None and getattr(model, "lm_head", None) is not None)


def _rename(osd: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in osd.items()}


def canonical_state_dicts(modules: list[nn.Module], optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of this rank's part, under canonical names (DTensor shards kept)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict  # imported here: export/generate need not

    model = _target(modules)
    msd, osd = get_state_dict(model, optimizer, options=_options())
    return msd, (_rename(osd, HEAD, EMB) if holds_head_copy(model) else osd)


def load_canonical_state_dicts(modules: list[nn.Module], optimizer, msd: dict, osd: dict) -> None:
    """Load state dicts in canonical naming (read into ``canonical_state_dicts``' templates) into this rank."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model = _target(modules)
    osd = _rename(osd, EMB, HEAD) if holds_head_copy(model) else osd
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options())


def drop_tied_head(sd: dict, tie_embeddings: bool) -> dict:
    """A full state dict without the tied head (it is the embedding): how exported models store it."""
    if tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd
