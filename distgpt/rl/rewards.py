"""Rewards: the function ``rl.reward`` names, loaded and checked, and a check of a whole RL job before anything
starts (the driver runs it, so a bad prompt file or reward fails in a second with its fix, not in a Ray actor)."""

from __future__ import annotations

import importlib

import numpy as np

from distgpt.rl.tasks import ARITHMETIC, TaskError, arithmetic_reward, load_prompts


def load_reward(spec: str, prompts_source: str):
    """The reward function ``spec`` names ('module:function'), or the built-in task's."""
    if not spec:
        if prompts_source == ARITHMETIC:
            return arithmetic_reward
        raise TaskError("rl.reward: a prompt file needs a reward — set rl.reward = 'package.module:function'")
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"rl.reward: cannot load {spec!r} ({type(e).__name__}: {e}) — it must be importable where "
                        f"the rollout coordinator runs (ship it with the job's working_dir)") from None
    if not callable(fn):
        raise TaskError(f"rl.reward: {spec!r} is not a function")
    return fn


def score(fn, prompts: list[str], completions: list[str]) -> np.ndarray:
    """Rewards of ``completions``, checked: one finite float each."""
    out = fn(prompts, completions)
    try:
        arr = np.asarray(out, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TaskError(f"rl.reward returned {type(out).__name__}, not a list of floats") from None
    if arr.size != len(completions) or not np.isfinite(arr).all():
        raise TaskError(f"rl.reward returned {arr.size} values for {len(completions)} completions"
                        f"{' (some not finite)' if arr.size == len(completions) else ''} — return one finite float "
                        f"per completion")
    return arr


def check_rl_job(job) -> str:
    """Load the prompts, the reward and the init model's tokenizer; score one completion; refuse prompts longer than
    rl.max_prompt_tokens. Returns a line describing the run. Raises TaskError (or ConfigError) naming the problem."""
    from distgpt.rl.generator import init_tokenizer

    r = job.rl
    train, held = load_prompts(r.prompts, "train"), load_prompts(r.prompts, "held_out")
    fn = load_reward(r.reward, r.prompts)
    score(fn, train[:1], [""])
    tok = init_tokenizer(job.init.from_)
    longest = max(train + held, key=lambda p: len(tok.encode(p)))
    if len(tok.encode(longest)) > r.max_prompt_tokens:
        raise TaskError(f"rl.max_prompt_tokens: the prompt {longest[:40]!r} is {len(tok.encode(longest))} tokens "
                        f"(> {r.max_prompt_tokens}) — raise rl.max_prompt_tokens or shorten the prompts")
    return (f"rl: {len(train)} training prompts, {min(len(held), r.eval_prompts)} held out; {r.prompts_per_step} "
            f"prompts × {r.group_size} completions per step; {r.rollout_actors} rollout actor(s), {r.placement}")
