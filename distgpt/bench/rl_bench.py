"""``distgpt bench rl``: RL fine-tuning on the shipped arithmetic task, measured as a user would run it.

1. Pre-train jobs/arithmetic.toml's model for ``--pretrain-steps`` in this process (not part of the RL budget).
2. ``distgpt rl jobs/rl.toml`` from it on an embedded Ray cluster: rollout actors, the learner, weight sync.
3. Report greedy exact-match accuracy on the held-out problems (never trained on, never an RL prompt) before and
   after, the RL wall time, and every step split into generation (waiting for the rollout batch), learning and
   weight sync — shares of the same steps, so the machine's speed cancels out.
Goals (issue #16): held-out accuracy at least doubles or reaches 0.9 within 10 CPU-minutes; sync ≤ 5 % of a step.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pretrain(work: str, steps: int) -> tuple[str, float]:
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared
    from distgpt.train.trainer import Trainer

    job = load_job(REPO / "jobs" / "arithmetic.toml", [
        f"--run.out_dir={work}/pre", f"--data.prepared={work}/data", f"--train.max_steps={steps}",
        "--train.progress=false", "--train.eval_interval=0"])
    t0 = time.perf_counter()
    ensure_prepared(job, progress=lambda s: None)
    result = Trainer(job, log=lambda s: None).fit()
    return result.final_dir, time.perf_counter() - t0


def run(steps: int, pretrain_steps: int, overrides: list[str], json_out: str | None) -> int:
    """Pre-train, fine-tune by RL, print the figures; non-zero exit when a goal is missed."""
    from distgpt.config import load_job
    from distgpt.orchestrator.driver import run_on_ray

    with tempfile.TemporaryDirectory() as work:
        model, pre_s = _pretrain(work, pretrain_steps)
        print(f"pre-trained jobs/arithmetic.toml for {pretrain_steps} steps in {pre_s:.0f} s")
        job = load_job(REPO / "jobs" / "rl.toml", [
            f"--init.from={model}", f"--run.out_dir={work}/rl", f"--train.max_steps={steps}",
            "--train.progress=false", "--checkpoint.interval=0", *overrides])
        t0 = time.perf_counter()
        run_on_ray(job, log=lambda s: None)
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in Path(f"{work}/rl/metrics.jsonl").read_text().splitlines()]
    figures = _figures(recs, wall, job)
    _print(figures)
    if json_out:
        Path(json_out).write_text(json.dumps(figures, indent=1))
    ok = (figures["acc_after"] >= max(2 * figures["acc_before"], 1e-9) or figures["acc_after"] >= 0.9) \
        and figures["sync_share"] <= 0.05 and wall <= 600
    return 0 if ok else 1


def _figures(recs: list[dict], wall: float, job) -> dict:
    evals = {r["step"]: r["accuracy"] for r in recs if r.get("kind") == "eval"}
    held = next(r["prompts"] for r in recs if r.get("kind") == "eval")
    steps = [r for r in recs if "reward_mean" in r]
    gen = [r["rollout_wait_s"] for r in steps]
    learn = [r["learn_s"] for r in steps]
    sync = [r["sync_s"] for r in steps]
    total = sum(gen) + sum(learn) + sum(sync)
    first, last = steps[: max(1, len(steps) // 5)], steps[-max(1, len(steps) // 5):]
    return {
        "steps": len(steps), "wall_s": wall, "held_out": held,
        "acc_before": evals[min(evals)], "acc_after": evals[max(evals)], "accuracy_by_step": evals,
        "reward_first_fifth": statistics.mean(r["reward_mean"] for r in first),
        "reward_last_fifth": statistics.mean(r["reward_mean"] for r in last),
        "gen_share": sum(gen) / total, "learn_share": sum(learn) / total, "sync_share": sum(sync) / total,
        "sync_share_p90": sorted(s / (g + lr + s) for g, lr, s in zip(gen, learn, sync, strict=True))[
            int(0.9 * (len(steps) - 1))],
        "step_s_median": statistics.median(g + lr + s for g, lr, s in zip(gen, learn, sync, strict=True)),
        "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] for r in steps),
        "kl_last": steps[-1]["kl"],
    }


def _print(f: dict) -> None:
    by_step = ", ".join(f"{s}: {a:.3f}" for s, a in sorted(f["accuracy_by_step"].items(), key=lambda kv: int(kv[0])))
    print(f"held-out exact match (greedy, {f['held_out']} problems): {f['acc_before']:.3f} → "
          f"{f['acc_after']:.3f} ({f['acc_after'] / max(f['acc_before'], 1e-9):.1f}×) in {f['steps']} steps, "
          f"{f['wall_s']:.0f} s of RL wall time (Ray start-up included)")
    print(f"  by step: {by_step}")
    print(f"  training reward (sampled): {f['reward_first_fifth']:.3f} in the first fifth of the steps → "
          f"{f['reward_last_fifth']:.3f} in the last; KL to the reference at the end {f['kl_last']:.3f}")
    print(f"step split: generation {f['gen_share']:.1%}, learning {f['learn_share']:.1%}, weight sync "
          f"{f['sync_share']:.1%} (p90 of steps {f['sync_share_p90']:.1%}); median step {f['step_s_median']:.2f} s; "
          f"generation {f['gen_tokens_per_s']:,.0f} tokens/s")
    goals = [("held-out accuracy ×2 or ≥ 0.9", f["acc_after"] >= 2 * f["acc_before"] or f["acc_after"] >= 0.9),
             ("within 10 CPU-minutes", f["wall_s"] <= 600), ("weight sync ≤ 5% of a step", f["sync_share"] <= 0.05)]
    print("goals: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals))
