"""``distgpt bench tune``: a tune of at most N trials against measuring every runnable plan, in one Ray session.

Both sides use the same trials (``tune/trial.py``: a real distgpt run per plan on its own placement group) and the
same steps; the exhaustive side measures every arm to the end in the cost model's order, then the tune runs (more
than once with ``--repeats``, so the stability of its choice shows). Reported:
  * quality: the exhaustive measurement of the plan the tune chose, over the exhaustive best (goal ≥ 0.95) — both
    from the one exhaustive campaign, so run-to-run noise does not flatter or punish the tune;
  * the cost model's top-1 alone, the same way;
  * wall time of the tune over the exhaustive search (goal ≤ 0.25);
  * Kendall's tau between predicted and measured step times over every plan;
  * noise: the median relative difference between the tune's and the exhaustive side's measurement of a plan both
    ran to the end.
"""

from __future__ import annotations

import json
import statistics
import tempfile

from distgpt.tune.report import TuneReport


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-a of two paired lists (1: same order, −1: reversed)."""
    n, s = len(xs), 0
    for i in range(n):
        for j in range(i + 1, n):
            a, b = xs[i] - xs[j], ys[i] - ys[j]
            s += (a * b > 0) - (a * b < 0)
    return 2 * s / (n * (n - 1)) if n > 1 else float("nan")


def _measured(rep: TuneReport) -> dict[int, float]:
    """arm → tokens/s of the trials that ran every step."""
    return {r.arm: r.tokens_per_s for r in rep.rows if r.status == "finished"}


def run(job_path: str, overrides: list[str], steps: int, trials: int, repeats: int, json_out: str | None) -> int:
    """Print the comparison; 0 when every trial of both sides ran."""
    from distgpt.config import load_job
    from distgpt.tune.runner import TuneOptions, tune_job

    job = load_job(job_path, [*overrides, "--train.progress=false"])
    quiet = lambda s: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        print(f"bench tune: {job_path} | {steps} steps per trial | exhaustive first, then {repeats}× tune "
              f"(≤ {trials} trials)", flush=True)
        ex = tune_job(job, TuneOptions(out=f"{tmp}/exhaustive", steps=steps, exhaustive=True), log=quiet)
        print(f"  exhaustive: {len(ex.rows)} plans in {ex.wall_s:.0f} s", flush=True)
        tunes = []
        for k in range(repeats):
            tunes.append(tune_job(job, TuneOptions(out=f"{tmp}/tune{k}", steps=steps, trials=trials), log=quiet))
            print(f"  tune {k + 1}: {len(tunes[-1].rows)} trials in {tunes[-1].wall_s:.0f} s", flush=True)
    meas = _measured(ex)
    best_arm = max(meas, key=meas.get)
    rows = ex.rows
    done = [r for r in rows if r.status == "finished"]
    tau = kendall_tau([r.predicted_s for r in done], [r.measured_s for r in done])
    top1 = meas.get(0, 0.0) / meas[best_arm]
    print(f"\nexhaustive best: {rows[[r.arm for r in rows].index(best_arm)].plan} at {meas[best_arm]:,.0f} tokens/s; "
          f"{len(done)}/{len(rows)} plans ran every step")
    print(f"cost model's top-1 alone: {rows[0].plan} → {top1:.3f} of the best")
    print(f"Kendall tau, predicted vs measured step time over {len(done)} plans: {tau:+.2f}")
    print(f"\n{'run':8} {'trials':>6} {'wall s':>7} {'vs exhaustive':>14} {'chosen plan':44} {'quality':>8}")
    out = {"exhaustive_s": ex.wall_s, "plans": len(rows), "top1_quality": top1, "kendall_tau": tau, "tunes": []}
    for k, t in enumerate(tunes):
        arm = t.best.arm if t.best else None
        q = meas.get(arm, 0.0) / meas[best_arm] if arm is not None else 0.0
        noise = [abs(r.tokens_per_s - meas[r.arm]) / meas[r.arm] for r in t.rows
                 if r.status == "finished" and r.arm in meas]
        print(f"tune {k + 1:<3} {len(t.rows):>6} {t.wall_s:>7.0f} {t.wall_s / ex.wall_s:>13.2f}× "
              f"{(t.best.plan if t.best else '-')[:44]:44} {q:>8.3f}")
        out["tunes"].append({"trials": len(t.rows), "wall_s": t.wall_s, "ratio": t.wall_s / ex.wall_s,
                             "chosen": t.best.plan if t.best else None, "quality": q,
                             "noise_median": statistics.median(noise) if noise else None})
    noise = [x["noise_median"] for x in out["tunes"] if x["noise_median"] is not None]
    if noise:
        print(f"measurement noise: median {statistics.median(noise):.1%} between the tune's and the exhaustive "
              f"side's tokens/s of the same plan")
    print("anchor: DeepSpeed's autotuner needs 13–34 experiments")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r.status == "finished" for r in rows) else 1
