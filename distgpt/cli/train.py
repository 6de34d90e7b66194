"""``distgpt train JOB``: pick the launcher (this process / torchrun ranks, or Ray), train, print a sample."""

from __future__ import annotations

import argparse
import os

from distgpt.cli import Command, job_argument
from distgpt.config_schema import ConfigError


def launcher(cluster_launcher: str) -> str:
    """'local' under torchrun or when asked; 'ray' otherwise (RAY_ADDRESS / --address, or an embedded cluster)."""
    if cluster_launcher != "auto":
        return cluster_launcher
    return "local" if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ else "ray"


def read_plan(path: str | None):
    """The Plan in a JSON file given with --plan (None without one): every problem with the file listed at once."""
    if not path:
        return None
    import json

    from distgpt.config_schema import build
    from distgpt.planner.plan import Plan

    fix = "write one with `distgpt plan JOB --inventory … --save FILE`"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError([f"cannot read it ({e}) — {fix}"], f"--plan {path}") from None
    problems: list[str] = []
    plan = build(Plan, data, "plan", problems)  # the same checks as a job's [plan] section: keys and types
    if problems:
        raise ConfigError(problems, f"--plan {path}")
    return plan


def check_plan(job, plan, where: str) -> None:
    """Refuse, before any data is prepared, a Plan that cannot run this job here: the processes running (under
    one process or torchrun: ``WORLD_SIZE``; on Ray the controller starts as many as the Plan needs), the model's
    shape and the batch. Every rank refuses alike."""
    from distgpt.planner.plan import Plan

    chosen: Plan = plan or job.plan
    world = None if where == "ray" else int(os.environ.get("WORLD_SIZE", "1"))
    problems = chosen.problems(job.workload().model, None, job.train.global_batch_size)
    if world is not None and not problems and chosen.world_size != world:
        problems = [f"needs dp×tp×pp = {chosen.dp}×{chosen.tp}×{chosen.pp} = {chosen.world_size} processes, but "
                    f"{world} {'is' if world == 1 else 'are'} running — run it under torchrun with that many "
                    "(torchrun --nproc-per-node=N -m distgpt.cli train …) or on Ray (--cluster.launcher=auto), "
                    "or change the degrees"]
    if problems:
        raise ConfigError([f"plan: {p}" for p in problems], "--plan" if plan else "the job's [plan]")


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Prepare data if needed, train (locally or on Ray), save the final model, print a sample."""
    from distgpt.config import load_job
    from distgpt.data.prepare import ensure_prepared

    job = load_job(args.job, overrides)
    plan = read_plan(args.plan)
    where = launcher(job.cluster.launcher)
    rl = job.objective.kind == "pg"
    if rl:
        where = _check_rl(job, where)
    if job.cluster.plan != "auto" or where != "ray":
        check_plan(job, plan, where)
    if where == "ray":
        from distgpt.orchestrator.driver import release, run_on_ray

        if not rl:  # an RL run's rows are its rollouts: there is no dataset to prepare
            ensure_prepared(job)
        home = os.getcwd()
        try:
            summary = run_on_ray(job, plan, args.address, while_starting=_load_for_after_the_run)
        finally:
            _return_to(home)
        res, n = summary.result, len(summary.recoveries)
        print(f"trained {res.steps} steps on Ray; {res.tokens_per_s:,.0f} tokens/s; "
              f"{n} recover{'y' if n == 1 else 'ies'}")
        sample(job, res.final_dir)
        release()
        return 0
    return _train_local(job, plan)


def _load_for_after_the_run() -> None:
    """What the driver needs once the run is over, loaded while the workers start (not before Ray starts: these
    imports take seconds).

    They load from a directory nothing replaces: in a Ray job with a working_dir the driver's cwd is that directory,
    and where several raylets share one temp dir (simulated nodes, the fake autoscaler's) each node's runtime-env agent
    unpacks the package to the same path, replacing the directory under the driver as the ranks start — and
    ``torch._dynamo`` reads ``os.getcwd()`` when imported. The run no longer needs the cwd: ``run_on_ray`` made the
    job's paths absolute before calling this; ``_return_to`` goes back after the run."""
    import tempfile

    os.chdir(tempfile.gettempdir())
    import distgpt.checkpoint.export  # noqa: F401
    import distgpt.data.chat  # noqa: F401
    import distgpt.model.generate  # noqa: F401


def _check_rl(job, where: str) -> str:
    """An RL job runs on Ray (its rollout actors are Ray actors); check its prompts and reward before starting."""
    from distgpt.rl.rewards import check_rl_job

    if where == "local":
        raise ConfigError(["cluster.launcher: objective 'pg' generates with Ray rollout actors — use 'ray' or 'auto' "
                           "(an embedded local Ray cluster needs nothing set up)"], "[cluster]")
    print(check_rl_job(job))
    return "ray"


def _return_to(home: str) -> None:
    """Back to the directory the run started in — the same path, which may now be a fresh copy of a Ray job's
    working_dir (see ``_load_for_after_the_run``) — or to ``/`` if it is gone for good."""
    os.chdir(home if os.path.isdir(home) else "/")


def _train_local(job, plan) -> int:
    from distgpt.data.prepare import ensure_prepared
    from distgpt.parallel.mesh import shutdown_distributed
    from distgpt.train.trainer import Trainer

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
    sample(job, result.final_dir)
    return 0


def sample(job, final_dir: str) -> None:
    """Print the job's [sample] from the model saved in ``final_dir``."""
    from distgpt.checkpoint.export import load_model_dir
    from distgpt.data.chat import chat_prompt, stop_ids
    from distgpt.model.generate import SamplingConfig, generate_text

    s = job.sample
    cfg = SamplingConfig(s.max_new_tokens, s.temperature, s.top_k, s.top_p, seed=job.run.seed)
    model, tok, _ = load_model_dir(final_dir)
    ids = chat_prompt(tok, [("user", s.prompt)]) if job.data.format == "chat" else None
    print(f"--- sample ({'user says' if ids else 'prompt'} {s.prompt!r}) ---")
    print(s.prompt if ids is None else "assistant: ", end="")
    for piece in generate_text(model, tok, s.prompt, cfg, prompt_ids=ids, stop_ids=stop_ids(tok) if ids else ()):
        print(piece, end="", flush=True)
    print(f"\n--- generate more: distgpt generate --checkpoint {final_dir} --prompt '...' ---")


def _arguments(p: argparse.ArgumentParser) -> None:
    job_argument(p)
    p.add_argument("--plan", help="a Plan as JSON (replaces the job's [plan] section)")
    p.add_argument("--address", default="", help="Ray cluster to run on (default: $RAY_ADDRESS, else an embedded "
                   "local cluster); ignored under torchrun or with --cluster.launcher=local")


COMMANDS = [Command(("train",), "train a job (prepares its data first if needed)", train, _arguments)]
