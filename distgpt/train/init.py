"""``[init] from``: start training from a trained model — a checkpoint root (its latest commit), a run's final/
directory or an export — instead of random weights.

The weights are read whole into the freshly built model before ``parallelize`` shards it, so they land in any Plan
(a run without ``init.from`` builds on the meta device and each rank makes only its part; this path still reads the
trained model whole on every rank). The optimizer and the schedule
start fresh. A model whose shape differs from the job's ``[model]`` is refused naming both shapes, except the
vocabulary, which may grow (chat markers, tokens of a new language): new embedding rows (and untied head rows) start
at the mean of the existing ones, so a new token begins as an "average" token rather than as noise that would
dominate the first steps' gradients.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from distgpt import storage
from distgpt.checkpoint.layout import committed, is_model_dir
from distgpt.config_schema import ConfigError
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT

FREE = ("vocab_size", "dropout")
"""Fields that may differ between the trained model and the job (vocabulary growth; dropout is training-only)."""


def read_initial(uri: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The trained model's config and its full state dict (tied head left out)."""
    from distgpt.checkpoint.export import load_model_dir, model_tensors, read_checkpoint_model

    if not is_model_dir(uri) and not committed(uri):
        raise ConfigError([f"init.from: {storage.redact(uri)} is neither a model directory (config.json) nor a "
                           "checkpoint root with a committed checkpoint — point it at a run's final/ directory, an "
                           "export, or a checkpoint.uri"], "[init]")
    model = load_model_dir(uri)[0] if is_model_dir(uri) else read_checkpoint_model(uri)[0]
    return model.cfg, model_tensors(model)


def describe(cfg: GPTConfig) -> str:
    """A model's shape in one line."""
    return (f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, n_head {cfg.n_head}, ffn_mult {cfg.ffn_mult}, vocab "
            f"{cfg.vocab_size}, block {cfg.block_size}, {cfg.pos_encoding}, {cfg.activation}, bias {cfg.bias}, "
            f"tied {cfg.tie_embeddings}")


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (V0, C) extended to (rows, C); new rows are the mean of the existing ones."""
    extra = weight.mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def load_initial_weights(model: GPT, uri: str) -> str:
    """Load the trained model at ``uri`` into ``model`` (growing the vocabulary if the job's is larger); returns a
    line for the log. ConfigError when the shapes differ."""
    src, sd = read_initial(uri)
    want = model.cfg
    differs = [k for k, v in asdict(src).items() if k not in FREE and getattr(want, k) != v]
    if differs or src.vocab_size > want.vocab_size:
        why = ", ".join(differs) if differs else f"vocab {src.vocab_size} > {want.vocab_size}"
        raise ConfigError([f"init.from: the model at {storage.redact(uri)} is {describe(src)}; the job builds "
                           f"{describe(want)} (differs in {why}) — set [model] to the trained model's shape"],
                          "[init]")
    grown = want.vocab_size - src.vocab_size
    if grown:
        for name in ("tok_emb.weight", "lm_head.weight"):
            if name in sd:
                sd[name] = grow_rows(sd[name], want.vocab_size)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (want.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # same config fields, so only a damaged file gets here
        raise ConfigError([f"init.from: {storage.redact(uri)} does not hold this model's weights (missing "
                           f"{missing}, unexpected {unexpected})"], "[init]")
    return (f"initialised from {storage.redact(uri)}" + (f" ({grown} new vocabulary rows, mean-initialised)"
                                                         if grown else ""))
