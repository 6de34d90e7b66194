"""``distgpt bench tune``: a tune of at most N trials against measuring every runnable plan, in one Ray session.

Both sides use the same trials (``tune/trial.py``: a real distgpt run per plan on its own placement group) and the
same steps; the exhaustive side measures every arm to the end in the cost model's order, then the tune runs (more
than once with ``--repeats``, so the stability of its choice shows). Reported:
  * quality: tokens/s of the plan the tune chose over the exhaustive best's. One campaign's single measurement of a
    plan differs from another's by more than the top plans differ (see noise), so the plans that matter — the
    exhaustive best, each tune's choice, the cost model's top-1 — are measured again in ``--confirm`` interleaved
    rounds (each round runs them back to back, in a rotated order), and quality is the mean of the per-round ratios,
    with their range;
  * the cost model's top-1 alone, the same way;
  * wall time of the tune over the exhaustive search (goal ≤ 0.25);
  * Kendall's tau between predicted and measured step times over every plan;
  * noise: the median relative difference between the tune's and the exhaustive side's measurement of a plan both
    ran to the end.
"""

from __future__ import annotations

import dataclasses
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


def _range(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


def _measured(rep: TuneReport) -> dict[int, float]:
    """arm → tokens/s of the trials that ran every step."""
    return {r.arm: r.tokens_per_s for r in rep.rows if r.status == "finished"}


def _confirm(job, steps: int, arms: list[int], rounds: int, tmp: str, quiet) -> dict[int, list[float]]:
    """Tokens/s of ``arms`` in ``rounds`` back-to-back rounds (rotated order): arm → one figure per round."""
    from distgpt.tune.runner import TuneOptions, tune_job

    out: dict[int, list[float]] = {a: [] for a in arms}
    for k in range(rounds):
        order = tuple(arms[k % len(arms):] + arms[:k % len(arms)])
        rep = tune_job(job, TuneOptions(out=f"{tmp}/confirm{k}", steps=steps, only=order), log=quiet)
        for r in rep.rows:
            out[r.arm].append(r.tokens_per_s if r.status == "finished" else float("nan"))
        print(f"  confirmation round {k + 1}: {len(rep.rows)} plans in {rep.wall_s:.0f} s", flush=True)
    return out


def _ratios(tps: dict[int, list[float]], arm: int, best: int) -> list[float]:
    return [a / b for a, b in zip(tps[arm], tps[best], strict=True)]


def run(job_path: str, overrides: list[str], steps: int, trials: int, repeats: int, json_out: str | None,
        confirm: int = 3) -> int:
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
        again = list(dict.fromkeys([best_arm, 0, *(t.best.arm for t in tunes if t.best)]))
        tps = _confirm(job, steps, again, confirm, tmp, quiet) if confirm else {a: [meas[a]] for a in again}
    rows = ex.rows
    done = [r for r in rows if r.status == "finished"]
    tau = kendall_tau([r.predicted_s for r in done], [r.measured_s for r in done])
    top1_runs = _ratios(tps, 0, best_arm)
    top1 = statistics.mean(top1_runs)
    print(f"\nexhaustive best: {rows[[r.arm for r in rows].index(best_arm)].plan} at {meas[best_arm]:,.0f} tokens/s; "
          f"{len(done)}/{len(rows)} plans ran every step")
    print(f"cost model's top-1 alone: {rows[0].plan} → {top1:.3f} of the best ({_range(top1_runs)})")
    print(f"Kendall tau, predicted vs measured step time over {len(done)} plans: {tau:+.2f}")
    print(f"\n{'run':8} {'trials':>6} {'wall s':>7} {'vs exhaustive':>14} {'chosen plan':44} {'quality':>8}  "
          f"confirmation rounds")
    out = {"exhaustive_s": ex.wall_s, "plans": len(rows), "top1_quality": top1, "kendall_tau": tau, "tunes": [],
           "exhaustive_rows": [dataclasses.asdict(r) for r in rows], "confirm": {str(k): v for k, v in tps.items()}}
    for k, t in enumerate(tunes):
        arm = t.best.arm if t.best else None
        runs = _ratios(tps, arm, best_arm) if arm is not None else [0.0]
        q = statistics.mean(runs)
        noise = [abs(r.tokens_per_s - meas[r.arm]) / meas[r.arm] for r in t.rows
                 if r.status == "finished" and r.arm in meas]
        print(f"tune {k + 1:<3} {len(t.rows):>6} {t.wall_s:>7.0f} {t.wall_s / ex.wall_s:>13.2f}× "
              f"{(t.best.plan if t.best else '-')[:44]:44} {q:>8.3f}  {_range(runs)}")
        out["tunes"].append({"trials": len(t.rows), "wall_s": t.wall_s, "ratio": t.wall_s / ex.wall_s,
                             "chosen": t.best.plan if t.best else None, "quality": q, "quality_rounds": runs,
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
