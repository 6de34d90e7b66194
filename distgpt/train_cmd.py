"""``distgpt train``: pick the launcher (this process / torchrun ranks, or Ray), train, print a sample."""

from __future__ import annotations

import argparse
import os

from distgpt.config import JobConfig, load_job
from distgpt.planner.plan import Plan


def launcher(job: JobConfig, address: str) -> str:
    """'local' under torchrun or when asked; 'ray' otherwise (RAY_ADDRESS / --address, or an embedded cluster)."""
    if job.cluster.launcher != "auto":
        return job.cluster.launcher
    return "local" if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ else "ray"


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Prepare data if needed, train (locally or on Ray), save the final model, print a sample."""
    from distgpt.trainer import ensure_prepared

    job = load_job(args.job, overrides)
    plan = Plan.from_json(open(args.plan).read()) if args.plan else None
    if launcher(job, args.address) == "ray":
        from distgpt.orchestrator.driver import run_on_ray

        ensure_prepared(job)
        summary = run_on_ray(job, plan, args.address)
        res = summary["result"]
        n = len(summary["recoveries"])
        print(f"trained {res['steps']} steps on Ray; {res['tokens_per_s']:,.0f} tokens/s; "
              f"{n} recover{'y' if n == 1 else 'ies'}")
        _sample(job, res["final_dir"])
        return 0
    return _train_local(job, plan)


def _train_local(job: JobConfig, plan: Plan | None) -> int:
    from distgpt.parallel.mesh import shutdown_distributed
    from distgpt.trainer import Trainer, ensure_prepared

    if int(os.environ.get("RANK", "0")) == 0:
        ensure_prepared(job)
    trainer = Trainer(job, plan=plan)  # under torchrun, joins the process group (other ranks wait for the data)
    try:
        result = trainer.fit()
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed()
    if not trainer.is_logger:
        return 0
    first, last = result.losses[0], result.losses[-1]
    val = f", val loss {list(result.val_losses.values())[-1]:.4f}" if result.val_losses else ""
    print(f"trained {result.steps} steps: loss {first:.4f} → {last:.4f}{val}; {result.tokens_per_s:,.0f} tokens/s")
    _sample(job, result.final_dir)
    return 0


def _sample(job: JobConfig, final_dir: str) -> None:
    from distgpt.checkpoint.export import load_model_dir
    from distgpt.model.generate import SamplingConfig, generate_text

    s = job.sample
    print(f"--- sample (prompt {s.prompt!r}) ---")
    print(s.prompt, end="")
    cfg = SamplingConfig(s.max_new_tokens, s.temperature, s.top_k, s.top_p, seed=job.run.seed)
    model, tok, _ = load_model_dir(final_dir)
    for piece in generate_text(model, tok, s.prompt, cfg):
        print(piece, end="", flush=True)
    print(f"\n--- generate more: distgpt generate --checkpoint {final_dir} --prompt '...' ---")
