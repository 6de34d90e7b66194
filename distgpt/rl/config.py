"""The ``[rl]`` section of a job: what the rollout actors generate, how it is rewarded, and how the policy-gradient
objective weighs it. Used when ``[objective] kind = "pg"`` (``distgpt rl JOB`` sets it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RLSection:
    """Reinforcement-learning fine-tuning (``objective.kind = "pg"``)."""

    prompts: str = "builtin:arithmetic"
    """The prompt set: 'builtin:arithmetic' (two-number addition, checked exactly), or a .jsonl file of objects with
    'prompt' (and optionally 'split' = 'held_out' for evaluation prompts), or a .txt file with one prompt per line."""
    reward: str = ""
    """'package.module:function' taking (prompts, completions) and returning one float per completion ('': the
    built-in task's own exact-match reward). It runs in the rollout coordinator, importable there."""
    group_size: int = 8
    """Completions sampled per prompt (G). GRPO normalises rewards within each group."""
    prompts_per_step: int = 8
    """Prompts per optimizer step; train.global_batch_size must be prompts_per_step × group_size."""
    max_prompt_tokens: int = 16
    """Longest prompt (tokens); a longer one is refused when the run starts."""
    max_new_tokens: int = 8
    """Tokens generated at most per completion; prompt + completion must fit data.seq_len + 1."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (1.0 samples the policy itself, which the objective assumes)."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0: off)."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """A completion ends at the first of these strings (kept as its last token, so the policy learns to stop)."""
    advantage: Literal["grpo", "reinforce"] = "grpo"
    """'grpo': (r − group mean) / (group std + 1e-4); 'reinforce': r − the batch's mean reward."""
    rollout_actors: int = 1
    """Rollout actors (each holds a copy of the policy and the reference)."""
    placement: Literal["colocate", "separate"] = "colocate"
    """'colocate': rollout actors share the learner's nodes and cores (they take turns: generation, then learning);
    'separate': they run on nodes of rollout_device with rollout_cpus CPUs each."""
    rollout_device: str = ""
    """Device type of the rollout nodes with placement = 'separate' ('' : any node)."""
    rollout_cpus: float = 1.0
    """CPUs each rollout actor reserves with placement = 'separate'."""
    sync_timeout_s: float = 120.0
    """A weight sync (or a rollout batch) that takes longer fails the run with an error naming the actor."""
    eval_interval: int = 10
    """Greedy exact-match accuracy on the held-out prompts every this many steps, and at the start and end (0: only
    at the start and end)."""
    eval_prompts: int = 200
    """Held-out prompts per evaluation (the first ones of the held-out set)."""


def rl_problems(job) -> list[str]:
    """Inconsistencies of an RL job, each as 'key: problem — fix'."""
    r, p = job.rl, []
    if job.objective.kind != "pg":
        return p
    if not job.init.from_:
        p.append("init.from: reinforcement learning starts from a trained model — point it at a run's final/ "
                 "directory or a checkpoint root")
    if min(r.group_size, r.prompts_per_step, r.max_prompt_tokens, r.max_new_tokens, r.rollout_actors) < 1:
        p.append("rl: group_size, prompts_per_step, max_prompt_tokens, max_new_tokens and rollout_actors must be ≥ 1")
    if r.group_size * r.prompts_per_step != job.train.global_batch_size:
        p.append(f"train.global_batch_size: {job.train.global_batch_size} ≠ rl.prompts_per_step × rl.group_size = "
                 f"{r.prompts_per_step * r.group_size} — a step learns from every completion of its prompts once")
    if r.advantage == "grpo" and r.group_size < 2:
        p.append("rl.group_size: GRPO normalises within a group — use at least 2, or rl.advantage = 'reinforce'")
    if r.max_prompt_tokens + r.max_new_tokens > job.seq_len + 1:
        p.append(f"rl.max_prompt_tokens + rl.max_new_tokens = {r.max_prompt_tokens + r.max_new_tokens} exceeds "
                 f"data.seq_len + 1 = {job.seq_len + 1} — raise data.seq_len or shorten them")
    if r.temperature <= 0 or r.top_k < 0:
        p.append("rl: need temperature > 0 and top_k ≥ 0")
    o = job.objective
    if o.kl_coef < 0 or not 0 <= o.clip_eps < 1:
        p.append("objective: need kl_coef ≥ 0 and 0 ≤ clip_eps < 1")
    if r.sync_timeout_s <= 0 or r.rollout_cpus < 0 or r.eval_interval < 0 or r.eval_prompts < 0:
        p.append("rl: need sync_timeout_s > 0, rollout_cpus ≥ 0, eval_interval ≥ 0, eval_prompts ≥ 0")
    if not r.stop:
        p.append("rl.stop: give at least one stop string (e.g. ['\\n']) so a completion can end before max_new_tokens")
    if r.reward and not (":" in r.reward and all(x.strip() for x in r.reward.split(":", 1))):
        p.append(f"rl.reward: {r.reward!r} is not 'package.module:function'")
    if not r.reward and r.prompts != "builtin:arithmetic":
        p.append("rl.reward: a prompt file needs a reward function — set rl.reward = 'package.module:function'")
    return p
