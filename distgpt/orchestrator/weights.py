"""Versioned weight sync from the learner to the rollout actors, through Ray's object store.

The learner's rank 0 turns the full state dict into numpy arrays and puts them **once** (``ray.put``); every rollout
actor gets the same object — on its own node Ray maps the arrays out of shared memory without a copy, elsewhere it
transfers them once per node. The object reference travels inside a list so Ray does not resolve it on the way: the
actor resolves it itself, inside ``load``. A version is the learner's step count; a sync that does not finish within
``rl.sync_timeout_s`` raises ``WeightSyncTimeout`` naming the actors still loading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError

from distgpt.errors import DistgptError


class WeightSyncTimeout(DistgptError, TimeoutError):
    """Rollout actors did not load a weight version in time."""


@dataclass(frozen=True)
class Weights:
    """One published weight version: the learner step it follows and a boxed reference to its arrays."""

    version: int
    box: list
    """[ObjectRef of dict[str, np.ndarray]] — a list so the reference is passed, not resolved."""
    nbytes: int


def to_arrays(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as contiguous numpy arrays; bf16 (which numpy lacks) as float32."""
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu()
        out[k] = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
    return out


def publish(sd: dict[str, torch.Tensor], version: int) -> Weights:
    """Put the weights of ``version`` into the object store once."""
    arrays = to_arrays(sd)
    return Weights(version, [ray.put(arrays)], sum(a.nbytes for a in arrays.values()))


def wait_loaded(refs: dict[int, ray.ObjectRef], version: int, timeout_s: float) -> None:
    """Wait for every actor's ``load`` of ``version`` (actor index → its call); raise WeightSyncTimeout naming the
    actors still loading after ``timeout_s``. Actor deaths propagate as RayActorError for the caller to replace."""
    deadline = time.monotonic() + timeout_s
    pending = dict(refs)
    while pending:
        left = deadline - time.monotonic()
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=max(left, 0))
        for i in [i for i, r in pending.items() if r in ready]:
            ray.get(pending.pop(i))
        if pending and time.monotonic() >= deadline:
            raise WeightSyncTimeout(
                f"weight sync of version {version}: rollout actor(s) {sorted(pending)} did not load within "
                f"rl.sync_timeout_s = {timeout_s:g} s — a rollout node may be overloaded or unreachable; raise "
                f"rl.sync_timeout_s or check the actors with `ray list actors`")


def fetch_for(box: list, timeout_s: float) -> dict[str, np.ndarray]:
    """Inside a rollout actor: resolve a published box (zero-copy on this node)."""
    try:
        return ray.get(box[0], timeout=timeout_s)
    except GetTimeoutError:
        raise WeightSyncTimeout(f"fetching published weights took longer than {timeout_s:g} s") from None
