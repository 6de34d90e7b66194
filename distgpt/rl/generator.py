"""Rollout generation on one model: G sampled completions per prompt, batched over a static KV cache, with the
policy's and the frozen reference's log-probability of every generated token. No Ray: a rollout actor wraps it.

All rows decode together (one ``StaticDecoder.decode`` per token for every row); a row that has stopped keeps its
slot until the batch ends and its outputs are ignored. Prompts of different lengths sit at their own positions (the
decoder is per-row), so nothing is padded on the left and positions match what the learner sees.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from distgpt.checkpoint.layout import is_model_dir
from distgpt.data.tokenizer import Tokenizer
from distgpt.infer.decoder import StaticDecoder
from distgpt.model.generate import filter_logits
from distgpt.model.gpt import GPT
from distgpt.train.threads import adopt_process_threads, use_threads


@dataclass
class Rollouts:
    """What one generation call returns, as numpy arrays (Ray hands those between processes without copying).
    Rows are prompts × group_size, the group of a prompt consecutive; a row is prompt + completion, zero-padded."""

    tokens: np.ndarray
    """(n, L) int64: the rows."""
    action: np.ndarray
    """(n, L − 1) bool: target positions that are generated tokens."""
    logp: np.ndarray
    """(n, L − 1) float32: the rollout policy's log-probability of each action (reported, never learnt from)."""
    ref_logp: np.ndarray
    """(n, L − 1) float32: the frozen reference model's log-probability of each action."""
    completions: list[str]
    """Decoded completions, the stop string excluded."""
    version: int
    """The weight version that generated them."""
    seconds: float
    """Wall time of the generation (and the reference pass)."""


def load_policy(uri: str) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a model directory or a checkpoint root's latest commit."""
    from distgpt.checkpoint.export import load_model_dir, read_checkpoint_model

    model, tok, _ = load_model_dir(uri) if is_model_dir(uri) else read_checkpoint_model(uri)
    return model.eval(), tok


def load_arrays(model: GPT, arrays: dict[str, np.ndarray]) -> None:
    """Copy a full state dict of numpy arrays (tied head dropped) into ``model``."""
    with warnings.catch_warnings():  # the arrays are read-only views of the object store; load_state_dict copies
        warnings.simplefilter("ignore", UserWarning)
        sd = {k: torch.from_numpy(v) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the rollout model (missing {missing[:3]}, unexpected {unexpected[:3]})")


class Generator:
    """A policy and its frozen reference, both loaded from ``init_uri``; ``generate`` samples rollouts."""

    def __init__(self, init_uri: str, threads: int = 0):
        if threads:
            use_threads(threads)
        self.policy, self.tokenizer = load_policy(init_uri)
        self.reference, _ = load_policy(init_uri)
        self.version = 0

    def load(self, arrays: dict[str, np.ndarray], version: int) -> None:
        """New policy weights (the learner's after ``version`` steps)."""
        load_arrays(self.policy, arrays)
        self.version = version

    def encode_prompts(self, prompts: list[str], limit: int) -> list[list[int]]:
        """Token ids of each prompt; ValueError naming one that is empty or longer than ``limit``."""
        ids = [self.tokenizer.encode(p) for p in prompts]
        for p, i in zip(prompts, ids, strict=True):
            if not i or len(i) > limit:
                raise ValueError(f"prompt {p[:40]!r} is {len(i)} tokens; rl.max_prompt_tokens is {limit} — raise "
                                 f"it or shorten the prompt")
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[str], group: int, settings, row_len: int, seed: int,
                 temperature: float | None = None) -> Rollouts:
        """``group`` completions of every prompt (``settings``: the job's [rl]); rows of ``row_len`` tokens.
        ``temperature`` 0 decodes greedily (evaluation). ``seed`` fixes the sampling: a re-issued request gives
        the same completions."""
        adopt_process_threads()  # the calling thread may not be the one that set the count (train/threads.py)
        t0 = time.perf_counter()
        temp = settings.temperature if temperature is None else temperature
        ids = [p for p in self.encode_prompts(prompts, settings.max_prompt_tokens) for _ in range(group)]
        gen = torch.Generator().manual_seed(seed)
        out = self._sample(ids, settings, temp, gen)
        tokens = np.zeros((len(ids), row_len), dtype=np.int64)
        action = np.zeros((len(ids), row_len - 1), dtype=bool)
        logp = np.zeros((len(ids), row_len - 1), dtype=np.float32)
        for r, (prompt, (done, lps)) in enumerate(zip(ids, out, strict=True)):
            row = prompt + done
            tokens[r, : len(row)] = row
            action[r, len(prompt) - 1 : len(row) - 1] = True
            logp[r, len(prompt) - 1 : len(row) - 1] = lps
        ref = self._ref_logp(tokens)
        completions = [self._text(done, settings.stop) for done, _ in out]
        return Rollouts(tokens, action, logp, np.where(action, ref, 0).astype(np.float32), completions,
                        self.version, time.perf_counter() - t0)

    def _sample(self, ids: list[list[int]], settings, temperature: float,
                gen: torch.Generator) -> list[tuple[list[int], list[float]]]:
        """Decode every row to a stop string, the end-of-text token or max_new_tokens: (tokens, log-probs) per row."""
        n = len(ids)
        dec = StaticDecoder(self.policy, n)
        logits = torch.cat([dec.prefill(torch.tensor([p]), torch.tensor(r), torch.tensor(len(p)))
                            for r, p in enumerate(ids)])
        pos = torch.tensor([len(p) for p in ids])
        done: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        live = torch.ones(n, dtype=torch.bool)
        eot = self.tokenizer.eot_id
        for _ in range(settings.max_new_tokens):
            nxt = self._pick(logits, temperature, settings.top_k, gen)  # (n,)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt.view(-1, 1)).view(-1)
            for r in torch.nonzero(live).view(-1).tolist():
                done[r].append(int(nxt[r]))
                lps[r].append(float(lp[r]))
                if int(nxt[r]) == eot or any(s in self.tokenizer.decode(done[r]) for s in settings.stop):
                    live[r] = False
            if not live.any() or int(pos.max()) + 1 >= self.policy.cfg.block_size:
                break
            logits = dec.decode(nxt, pos, dec.positions[: int(pos.max()) + 1])
            pos = pos + 1
        return list(zip(done, lps, strict=True))

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, 1.0), dim=-1)
        return torch.multinomial(probs, 1, generator=gen).view(-1)

    def _ref_logp(self, tokens: np.ndarray) -> np.ndarray:
        """log π_ref of every target of the rows (one forward pass of the reference)."""
        t = torch.from_numpy(tokens)
        logits = self.reference(t[:, :-1]).float()
        return torch.log_softmax(logits, dim=-1).gather(2, t[:, 1:].unsqueeze(-1)).squeeze(-1).numpy()

    def _text(self, completion: list[int], stops) -> str:
        """The completion's text up to (not including) its first stop string, as Rollouts documents."""
        text = self.tokenizer.decode([t for t in completion if t != self.tokenizer.eot_id])
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        return text[: min(cuts)] if cuts else text


def init_tokenizer(uri: str) -> Tokenizer:
    """The tokenizer of the model at ``uri`` (a model directory, or a checkpoint root's latest commit) — without
    reading its weights."""
    from distgpt.checkpoint.layout import committed
    from distgpt.data.loader import load_tokenizer

    return load_tokenizer(uri if is_model_dir(uri) else committed(uri)[-1].uri)
