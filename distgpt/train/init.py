"""``[init] from``: start training from a trained model — a checkpoint root (its latest commit), a run's final/
directory or an export — instead of random weights.

The trainer builds the model on the meta device either way; ``parallelize`` carves this rank's part and fills it
from ``TrainedWeights`` one tensor at a time (``parallel/materialize.py``), so no rank holds the whole trained model:
from a model directory each tensor is read from the safetensors file by its offsets when it is needed (host peak:
the largest single tensor); from a checkpoint root DCP reads, into each rank's own sharded parameters, only the
slices it holds (a vocabulary that grows: the embedding alone is read whole, then grown).
The optimizer and the schedule start fresh. A model whose shape differs from the job's ``[model]`` is refused
naming both shapes, except the vocabulary, which may grow (chat markers, tokens of a new language): new embedding
rows (and untied head rows) start at the mean of the existing ones, so a new token begins as an "average" token
rather than as noise that would dominate the first steps' gradients.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from distgpt import storage
from distgpt.checkpoint.layout import committed, is_model_dir, read_manifest
from distgpt.config_schema import ConfigError
from distgpt.model.config import GPTConfig
from distgpt.model.gpt import GPT

FREE = ("vocab_size", "dropout")
"""Fields that may differ between the trained model and the job (vocabulary growth; dropout is training-only)."""


def initial_config(uri: str) -> GPTConfig:
    """The trained model's config, read from its config.json or its latest checkpoint's manifest (no tensors)."""
    _check_source(uri)
    if is_model_dir(uri):
        return _model_dir_config(uri)
    return GPTConfig.from_dict(read_manifest(committed(uri)[-1].uri)["model"])


class TrainedWeights:
    """A trained model's tensors by one-process name, each read when asked for (``parallel.materialize``'s
    ``WeightSource``): from a model directory's safetensors file, or from a state dict already in memory."""

    def __init__(self, uri: str, cfg: GPTConfig, tensors: dict[str, torch.Tensor] | None = None):
        self.uri, self.cfg, self._tensors = uri, cfg, tensors
        self._file = None if tensors is not None else _open_safetensors(uri)
        self._keys = set(tensors) if tensors is not None else set(self._file.keys())

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """``name``'s trained value, its vocabulary rows grown to ``shape`` (a tied head is the embedding)."""
        key = "tok_emb.weight" if name == "lm_head.weight" and self.cfg.tie_embeddings else name
        if key not in self._keys:
            why = ("it is an int8 inference artifact — start from the fp32 model it was exported from"
                   if f"{key}.int8" in self._keys else "export the model again")
            raise ConfigError([f"init.from: {storage.redact(self.uri)} holds no {key!r} — {why}"], "[init]")
        value = self._tensors[key] if self._tensors is not None else self._file.get_tensor(key)
        if key in ("tok_emb.weight", "lm_head.weight") and value.shape[0] < shape[0]:
            value = grow_rows(value, shape[0])
        if tuple(value.shape) != shape:  # same config fields, so only a damaged file gets here
            raise ConfigError([f"init.from: {key} in {storage.redact(self.uri)} is {tuple(value.shape)}, the job's "
                               f"model needs {shape} — export the model again"], "[init]")
        return value


class CheckpointWeights:
    """A checkpoint root's latest committed model, read by DCP straight into a module's parameters (each rank the
    slices of its shards; every file read checked against the manifest) — ``materialize``'s ``ShardedSource``.

    A vocabulary that grows: the embedding (and an untied head) is read whole at its trained size — one tensor, the
    largest there is, which set-up already budgets for — grown, and this rank keeps its slice; every other tensor
    still arrives as this rank's slices only."""

    def __init__(self, uri: str, cfg: GPTConfig):
        self.uri, self.cfg = uri, cfg

    def fill(self, module: torch.nn.Module) -> None:
        """Collective: load the trained values of ``module``'s parameters (a tied head copy from the embedding)."""
        from distgpt.checkpoint.manager import CheckpointManager
        from distgpt.parallel.materialize import one_process_name

        targets, grown = {}, {}
        for name, p in module.named_parameters():
            key = one_process_name(name)
            key = "tok_emb.weight" if key == "lm_head.weight" and self.cfg.tie_embeddings else key
            if key in ("tok_emb.weight", "lm_head.weight") and p.shape[0] != self.cfg.vocab_size:
                targets[key] = torch.empty((self.cfg.vocab_size, *p.shape[1:]), dtype=p.dtype)
                grown[key] = p
            else:
                targets[key] = p.detach()
        mgr = CheckpointManager(self.uri)
        mgr.read_into(mgr.committed()[-1], {"model": targets})
        for key, p in grown.items():
            _keep_slice(p, grow_rows(targets[key], p.shape[0]))


def _keep_slice(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy into ``p`` its part of ``full`` (a DTensor keeps its own shard, sliced locally: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(p, DTensor):
            shard = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(full)


def open_initial(uri: str, want: GPTConfig) -> tuple[TrainedWeights | CheckpointWeights, str]:
    """The trained weights at ``uri`` for a model of config ``want`` and a line for the log; ConfigError when
    the shapes differ (other than a larger vocabulary)."""
    src = initial_config(uri)
    _check_shapes(uri, src, want)  # before anything large is read
    weights = TrainedWeights(uri, src) if is_model_dir(uri) else CheckpointWeights(uri, src)
    grown = want.vocab_size - src.vocab_size
    return weights, (f"initialised from {storage.redact(uri)}" + (f" ({grown} new vocabulary rows, "
                                                                  "mean-initialised)" if grown else ""))


def _check_source(uri: str) -> None:
    if not is_model_dir(uri) and not committed(uri):
        raise ConfigError([f"init.from: {storage.redact(uri)} is neither a model directory (config.json) nor a "
                           "checkpoint root with a committed checkpoint — point it at a run's final/ directory, an "
                           "export, or a checkpoint.uri"], "[init]")


def _check_shapes(uri: str, src: GPTConfig, want: GPTConfig) -> None:
    differs = [k for k, v in asdict(src).items() if k not in FREE and getattr(want, k) != v]
    if differs or src.vocab_size > want.vocab_size:
        why = ", ".join(differs) if differs else f"vocab {src.vocab_size} > {want.vocab_size}"
        raise ConfigError([f"init.from: the model at {storage.redact(uri)} is {describe(src)}; the job builds "
                           f"{describe(want)} (differs in {why}) — set [model] to the trained model's shape"],
                          "[init]")


def _model_dir_config(uri: str) -> GPTConfig:
    from distgpt.checkpoint.export import CONFIG_FILE

    try:
        return GPTConfig.from_dict(json.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)))["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError([f"init.from: {storage.redact(uri)}/{CONFIG_FILE} is damaged ({type(e).__name__}: "
                           f"{e}) — export the model again"], "[init]") from None


def _open_safetensors(uri: str):
    """``safe_open`` on the model file (a remote one is first copied, streamed, to a local temporary file: safetensors
    reads by offset from a local file)."""
    from safetensors import safe_open

    from distgpt.checkpoint.export import MODEL_FILE

    path, local = storage.join(uri, MODEL_FILE), ""
    try:
        if "://" in path:
            import tempfile

            import pyarrow.fs as pafs

            fs, inside = storage.resolve(path)
            local = tempfile.NamedTemporaryFile(prefix="distgpt-init-", suffix=".safetensors", delete=False).name
            pafs.copy_files(inside, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return safe_open(local or path, framework="pt")
    except Exception as e:
        raise ConfigError([f"init.from: {storage.redact(uri)}/{MODEL_FILE} cannot be read "
                           f"({storage.redact(str(e))}) — export the model again"], "[init]") from None
    finally:
        if local:  # the opened file stays readable (POSIX): nothing is left behind once it is closed
            os.unlink(local)


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
    """Load the trained model at ``uri`` whole into ``model`` (a real, one-process model — ``distgpt tokenizer
    extend``; training uses ``open_initial``); returns a line for the log. ConfigError when the shapes differ."""
    weights, line = open_initial(uri, model.cfg)
    if isinstance(weights, CheckpointWeights):
        weights.fill(model)
        return line
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights.tensor(name, tuple(p.shape)))
    return line
