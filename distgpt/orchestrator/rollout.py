"""Rollout actors: Ray actors that each hold a policy and its frozen reference (``rl.generator.Generator``), load the
learner's published weights, and sample completions. The coordinator (``orchestrator/coordinator.py``) drives them.

What crosses a process boundary is typed: ``Rollouts`` (numpy rows) out of an actor, ``RolloutBatch`` (the
learner's columns plus ``RolloutStats``) out of the coordinator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distgpt.orchestrator.inventory import RayNode
from distgpt.orchestrator.weights import fetch_for
from distgpt.rl.generator import Generator, Rollouts


@dataclass
class RolloutStats:
    """What a step's rollouts were like (the learner's rank 0 adds them to the step's metric record)."""

    reward_mean: float
    reward_std: float
    response_len: float
    """Mean generated tokens per completion (the stop token included)."""
    kl: float
    """Mean k3 estimate of KL(π_rollout ‖ π_ref) per generated token."""
    gen_s: float
    """Wall time from request to the batch in the object store (generation, reference pass, rewards)."""
    gen_tokens_per_s: float
    """Generated tokens per second of ``gen_s`` over all rollout actors."""
    restarts: int
    """Rollout actors replaced so far in this run."""
    reissued: int
    """Requests re-issued so far (an actor died holding them)."""


@dataclass
class RolloutBatch:
    """One optimizer step's rollouts, as the learner takes them."""

    step: int
    version: int
    """The weight version that generated every row (the coordinator refuses to mix versions)."""
    prompt_start: int
    """Global prompt index of the batch's first prompt (the prompt cursor)."""
    prompt_digest: int
    """crc32 of the batch's prompt ids: lets a test check that no batch was lost or repeated."""
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    """tokens (n, L), action (n, L − 1), advantages (n,), ref_logp (n, L − 1)."""
    stats: RolloutStats | None = None


class RolloutWorker:
    """The actor body (``ray.remote`` is applied by ``start_rollout_actor``)."""

    def __init__(self, init_uri: str, threads: int, sync_timeout_s: float):
        # 0 (colocated): every core of this node, taken in turn with the learner. Not torch's default: Ray sets
        # OMP_NUM_THREADS=1 in an actor that reserves no CPU, so that default would be one thread.
        self.gen = Generator(init_uri, threads or os.cpu_count() or 1)
        self.sync_timeout_s = sync_timeout_s

    def ready(self) -> str:
        """The node this actor runs on (answered once the models are loaded)."""
        return ray.get_runtime_context().get_node_id()

    def load(self, version: int, box: list) -> int:
        """Load the published weights of ``version`` (resolved here, from the object store)."""
        self.gen.load(fetch_for(box, self.sync_timeout_s), version)
        return version

    def generate(self, prompts: list[str], group: int, settings, row_len: int, seed: int,
                 temperature: float | None = None) -> Rollouts:
        """``group`` completions per prompt (see ``Generator.generate``)."""
        return self.gen.generate(prompts, group, settings, row_len, seed, temperature)

    def pid(self) -> int:
        """The actor's process id (drills and tests kill it)."""
        return os.getpid()


def rollout_nodes(job, nodes: list[RayNode], learner_nodes: list[str]) -> list[str]:
    """Node ids the rollout actors go to, round-robin: the learner's nodes ('colocate'), or the nodes of
    ``rl.rollout_device`` ('separate', any node when it is ''). ValueError when there is none."""
    r = job.rl
    if r.placement == "colocate":
        return sorted(set(learner_nodes))
    want = r.rollout_device.lower()
    chosen = [n.node_id for n in nodes if not want or n.device.lower() == want]
    if not chosen:
        have = ", ".join(sorted({n.device for n in nodes})) or "none"
        raise ValueError(f"rl.rollout_device: no node of type {r.rollout_device!r} is up (device types: {have}) — "
                         f"name one of them, or set rl.placement = 'colocate'")
    return chosen


def start_rollout_actor(job, node_id: str, index: int, name: str):
    """One rollout actor pinned to ``node_id``. Colocated actors reserve no CPU: they take turns with the learner
    on its cores (generation, then learning); separate ones reserve ``rl.rollout_cpus`` each."""
    r = job.rl
    cpus = 0 if r.placement == "colocate" else r.rollout_cpus
    threads = job.train.threads
    if not threads and r.placement == "separate":
        threads = max(1, int(r.rollout_cpus))  # colocated: 0, the node's cores (``RolloutWorker``)
    return ray.remote(RolloutWorker).options(
        num_cpus=cpus, name=f"{name}-rollout{index}-{os.urandom(3).hex()}", max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(job.init.from_, threads, r.sync_timeout_s)
