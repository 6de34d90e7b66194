"""``pg``: policy-gradient fine-tuning on rollouts — the model's own completions, rewarded, against a reference.

A rollout row is a prompt and one sampled completion, padded to the row length; ``action`` marks the targets that are
completion tokens (the tokens the policy chose). With the policy's log-probability log π(a_t) *recomputed here*, in
the learner's forward pass, and the advantage A of the row's completion, the per-token loss is

    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε) A)  +  β · k3_t,      ρ_t = exp(log π(a_t) − log π_old(a_t))
    k3_t = exp(log π_ref(a_t) − log π(a_t)) − (log π_ref(a_t) − log π(a_t)) − 1

averaged over every action token of the global batch (``base.py``'s formula). π_old is the policy that generated the
rows; rollouts here are on-policy (the learner's weights at this step), so π_old = π detached: ρ ≡ 1 in value and
∇ℓ = −A ∇log π — REINFORCE — with the clip guarding batches that carry an explicit ``old_logp`` column. k3 is the
unbiased, non-negative KL(π‖π_ref) estimator of Schulman (2020); it is 0 where π = π_ref. The reference log-probs come
with the batch: the reference is frozen, so who computes them does not matter; the policy's never do.
"""

from __future__ import annotations

import numpy as np
import torch

from distgpt.data.batch import Batch
from distgpt.data.loader import DatasetError
from distgpt.train.objectives.base import Objective, token_cross_entropy

LOGRATIO_CLAMP = 20.0
"""|log π_ref − log π| beyond this is clamped in k3: exp of a large gap would overflow before it is masked."""


def group_advantages(rewards: np.ndarray, group_size: int, kind: str = "grpo") -> np.ndarray:
    """Advantages of rewards laid out as consecutive groups of ``group_size`` completions of one prompt.
    'grpo': (r − group mean) / (group std + 1e-4) (a group whose rewards are all equal teaches nothing: zeros);
    'reinforce': r − the batch's mean reward (a baseline that lowers variance without bias)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not make groups of {group_size}")
    if kind == "reinforce":
        return (r - r.mean()).astype(np.float32)
    g = r.reshape(-1, group_size)
    adv = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + 1e-4)
    return adv.reshape(-1).astype(np.float32)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate exp(d) − d − 1 with d = log π_ref − log π (module docstring)."""
    d = (ref_logp - logp).clamp(-LOGRATIO_CLAMP, LOGRATIO_CLAMP)
    return torch.exp(d) - d - 1


def k3_numpy(logp: np.ndarray, ref_logp: np.ndarray, mask: np.ndarray) -> float:
    """Mean k3 over the masked tokens (the rollout side's KL monitor)."""
    if not mask.any():
        return 0.0
    d = np.clip(ref_logp[mask] - logp[mask], -LOGRATIO_CLAMP, LOGRATIO_CLAMP).astype(np.float64)
    return float((np.exp(d) - d - 1).mean())


class PolicyGradient(Objective):
    """Clipped policy gradient with a KL penalty, on rollout batches (``orchestrator/rl_source.py`` makes them)."""

    name = "pg"

    def __init__(self, settings=None):
        """``settings``: the job's ``[objective]`` (``kl_coef``, ``clip_eps``)."""
        super().__init__(settings)
        self.kl_coef = getattr(settings, "kl_coef", 0.0)
        self.clip_eps = getattr(settings, "clip_eps", 0.0)

    def check_data(self, manifest: dict) -> None:
        """Rollouts only: a prepared token dataset has no actions or advantages."""
        if "action" not in manifest.get("columns", []):
            raise DatasetError("objective 'pg' learns from rollouts, not a prepared dataset — run it with "
                               "`distgpt rl JOB` (or `distgpt train` on Ray), which starts the rollout actors")

    def make_batch(self, columns: dict[str, torch.Tensor]) -> Batch:
        tokens = columns["tokens"]
        extras = {"advantages": columns["advantages"].float().view(-1, 1),
                  "ref_logp": columns["ref_logp"].float()}
        if "old_logp" in columns:
            extras["old_logp"] = columns["old_logp"].float()
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                     loss_mask=columns["action"].bool().contiguous(), extras=extras)

    def token_losses(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        logp = -token_cross_entropy(logits, batch.targets)  # (B, T): log π(a_t), with gradient
        old = batch.extras.get("old_logp")
        ratio = torch.exp(logp - (old if old is not None else logp.detach()))
        adv = batch.extras["advantages"]
        pg = -ratio * adv
        if self.clip_eps > 0:
            pg = torch.maximum(pg, -ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv)
        ell = pg + self.kl_coef * k3(logp, batch.extras["ref_logp"]) if self.kl_coef else pg
        # Padding positions may hold any value (a huge k3 where π_ref and π disagree on a pad token): zero them here,
        # since the base class's mask multiplies, and 0 · inf is NaN.
        return torch.where(batch.loss_mask, ell, torch.zeros((), dtype=ell.dtype, device=ell.device))
