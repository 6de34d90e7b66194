"""The rollout coordinator: one threaded Ray actor per RL run that owns the rollout actors, the prompt set, the reward
and the published weights, and turns "step s, prompts from cursor c" into one ``RolloutBatch`` in the object store.

Protocol with the learner (``orchestrator/rl_source.py``), for step s:
1. the learner's rank 0 publishes the weights of version s (``publish``): every rollout actor loads them, or the
   sync fails with ``WeightSyncTimeout``; a version lower than the last one (a learner resumed from a checkpoint)
   discards every batch made since;
2. every learner rank asks for ``batch(s, cursor)``; the first request generates — each actor takes a contiguous
   share of the prompts, G completions each, with a seed fixed by (run seed, step, share) — rewards and advantages
   are computed, the batch is put once; the others get the same reference. A batch is only made once version s is
   published, so its rows are on-policy.
An actor that dies is replaced (it loads the current weights) and its share re-issued with the same seed: the batch
is the one it would have been. Held-out accuracy (``evaluate``) is greedy exact match on the held-out prompts.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib

import numpy as np
import ray
from ray.exceptions import RayActorError

from distgpt.data.loader import sample_ids
from distgpt.orchestrator.rollout import RolloutBatch, RolloutStats, start_rollout_actor
from distgpt.orchestrator.weights import WeightSyncTimeout, wait_loaded
from distgpt.rl.generator import Rollouts
from distgpt.rl.rewards import load_reward, score
from distgpt.rl.tasks import load_prompts
from distgpt.train.objectives.pg import group_advantages, k3_numpy


class RolloutCoordinator:
    """The actor body (a threaded actor: every learner rank calls ``batch`` at once)."""

    def __init__(self, job, nodes: list[str], name: str):
        r = job.rl
        self.job, self.rl, self.name, self.nodes = job, r, name, nodes
        self.prompts = load_prompts(r.prompts, "train")
        self.held_out = load_prompts(r.prompts, "held_out")[: r.eval_prompts]
        self.reward = load_reward(r.reward, r.prompts)
        self.row_len = job.seq_len + 1
        self.cond = threading.Condition()
        self.actors = [start_rollout_actor(job, nodes[i % len(nodes)], i, name) for i in range(r.rollout_actors)]
        ray.get([a.ready.remote() for a in self.actors], timeout=job.cluster.start_timeout_s)
        self.version, self.weights = -1, None
        self.cache: dict[int, list] = {}
        self.restarts = self.reissued = 0
        self.reference_digest = _digest(job.init.from_)

    # --- weights ------------------------------------------------------------------------------------------------
    def publish(self, version: int, box: list) -> float:
        """Load weight ``version`` into every rollout actor; returns the seconds it took."""
        t0 = time.perf_counter()
        with self.cond:
            if version < self.version:  # a learner resumed from a checkpoint: batches made since are another past
                self.cache.clear()
            self._sync(version, box)
            self.version, self.weights = version, box
            self.cond.notify_all()
        return time.perf_counter() - t0

    def _sync(self, version: int, box: list) -> None:
        calls = {i: a.load.remote(version, box) for i, a in enumerate(self.actors)}
        for _ in range(3):  # actors that die while loading are replaced, up to twice
            try:
                wait_loaded(calls, version, self.rl.sync_timeout_s)
                return
            except RayActorError:
                dead = [i for i, ref in calls.items() if _died(ref)]
                calls = {i: self._replace(i, box, version) for i in dead}
        raise WeightSyncTimeout(f"weight sync of version {version}: rollout actors kept dying while loading")

    def _replace(self, i: int, box: list | None, version: int):
        """A fresh actor in slot ``i`` (same node, or another rollout node if that one is gone); returns its load
        call for ``box`` (or its ready call when nothing is published yet)."""
        self.restarts += 1
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        nodes = [n for n in self.nodes if n in alive] or self.nodes
        self.actors[i] = start_rollout_actor(self.job, nodes[i % len(nodes)], i, self.name)
        return self.actors[i].load.remote(version, box) if box is not None else self.actors[i].ready.remote()

    # --- batches ------------------------------------------------------------------------------------------------
    def batch(self, step: int, cursor: int, fresh: bool = False) -> list:
        """[ObjectRef of the RolloutBatch] for learner step ``step`` from prompt ``cursor`` on (made once)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.version >= step, timeout=self.rl.sync_timeout_s):
                raise WeightSyncTimeout(f"rollout batch for step {step}: no weights of version {step} were "
                                        f"published within rl.sync_timeout_s = {self.rl.sync_timeout_s:g} s (the "
                                        f"learner's rank 0 publishes them; is it alive?)")
            if fresh or step not in self.cache:
                self.cache = {s: b for s, b in self.cache.items() if s >= step - 1}
                self.cache[step] = [ray.put(self._make(step, cursor))]
            return self.cache[step]

    def _make(self, step: int, cursor: int) -> RolloutBatch:
        t0 = time.perf_counter()
        r = self.rl
        ids = sample_ids(len(self.prompts), self.job.run.seed, cursor, r.prompts_per_step)
        prompts = [self.prompts[i] for i in ids]
        parts = self._generate(prompts, r.group_size, step, None)
        rows = _concat(parts)
        completions = [c for p in parts for c in p.completions]
        rewards = score(self.reward, [p for p in prompts for _ in range(r.group_size)], completions)
        adv = group_advantages(rewards, r.group_size, r.advantage)
        gen_s = time.perf_counter() - t0
        n_tok = int(rows["action"].sum())
        stats = RolloutStats(float(rewards.mean()), float(rewards.std()), n_tok / len(completions),
                             float(k3_numpy(rows["logp"], rows["ref_logp"], rows["action"])), gen_s,
                             n_tok / max(gen_s, 1e-9), self.restarts, self.reissued)
        cols = {"tokens": rows["tokens"], "action": rows["action"], "advantages": adv, "ref_logp": rows["ref_logp"]}
        return RolloutBatch(step, self.version, cursor, zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()),
                            cols, stats)

    def _generate(self, prompts: list[str], group: int, step: int, temperature: float | None) -> list[Rollouts]:
        """Split ``prompts`` into one contiguous share per actor, generate, replace dead actors and re-issue."""
        n = len(self.actors)
        shares = [s for s in np.array_split(np.arange(len(prompts)), n) if len(s)]
        seeds = np.random.SeedSequence([self.job.run.seed, step]).generate_state(len(shares)).tolist()
        out: list[Rollouts | None] = [None] * len(shares)
        for _ in range(3):
            calls = {i: self.actors[i].generate.remote([prompts[j] for j in s], group, self.rl, self.row_len,
                                                       seeds[i], temperature)
                     for i, s in enumerate(shares) if out[i] is None}
            for i, ref in calls.items():
                try:
                    out[i] = ray.get(ref, timeout=self.rl.sync_timeout_s + 600)
                except RayActorError:
                    self.reissued += 1
                    ray.get(self._replace(i, self.weights, self.version), timeout=self.rl.sync_timeout_s)
            if all(o is not None for o in out):
                return out  # type: ignore[return-value]
        raise RuntimeError("rollout actors kept dying while generating (3 attempts) — see their logs")

    def evaluate(self) -> tuple[float, int] | None:
        """(greedy exact-match reward (mean), prompts) on the held-out prompts with the current weights; None
        without any."""
        if not self.held_out:
            return None
        with self.cond:
            parts = self._generate(self.held_out, 1, 0, 0.0)  # greedy: the seed is unused
        completions = [c for p in parts for c in p.completions]
        return float(score(self.reward, self.held_out, completions).mean()), len(self.held_out)

    def state(self) -> dict:
        """What the learner's checkpoint records of the rollout side."""
        return {"reference": self.reference_digest, "restarts": self.restarts, "reissued": self.reissued,
                "actors": len(self.actors)}

    def actor_pids(self) -> list[int]:
        """Process ids of the rollout actors (tests kill one)."""
        return ray.get([a.pid.remote() for a in self.actors])


def _died(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except Exception:
        return False
    return False


def _concat(parts: list[Rollouts]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("tokens", "action", "logp", "ref_logp")}


def _digest(uri: str) -> str:
    """sha256 of the reference model's weights file (or of the checkpoint's manifest)."""
    from distgpt import storage
    from distgpt.checkpoint.export import MODEL_FILE
    from distgpt.checkpoint.layout import MANIFEST, committed, is_model_dir

    if is_model_dir(uri):
        return hashlib.sha256(storage.read_bytes(storage.join(uri, MODEL_FILE))).hexdigest()[:16]
    last = committed(uri)[-1]
    return hashlib.sha256(storage.read_bytes(storage.join(uri, f"step-{last.step:08d}", MANIFEST))).hexdigest()[:16]


def start_coordinator(job, nodes, learner_nodes: list[str], name: str):
    """Start the run's coordinator (named ``name``, on this node, reserving no CPU) and wait until its rollout actors
    have loaded their models; errors (an unloadable reward, no rollout node) surface here."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distgpt.orchestrator.rollout import rollout_nodes

    where = rollout_nodes(job, nodes, learner_nodes)
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(RolloutCoordinator).options(
        num_cpus=0, name=name, max_concurrency=job.plan.world_size + 8, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(job, where, name)
    ray.get(actor.state.remote(), timeout=job.cluster.start_timeout_s + 60)
    return actor
