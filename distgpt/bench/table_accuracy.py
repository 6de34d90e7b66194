"""``distgpt bench plan-accuracy --table FILE.csv``: the cost model against a table of measured runs.

Prints, for the rows marked ``fit`` and ``held_out`` separately and per device type: mean / median / max |error| of
the predicted step time, the rank agreement (Kendall tau over pairs of runs of the same model on the same device
type; and over pairs of plans for the same job on the same GPUs, where the table has them), peak-memory error where
the table has it, and how many of the runs would not fit in the device's memory as distgpt runs the same plan (its
model keeps more per layer than some systems do: see ``planner/cost.py``).
Then, for each held-out device type, the same after calibrating that type on its single smallest run.
``--fit`` refits the layer-time figures on the ``fit`` rows and prints them in the form ``planner/efficiency.py``
keeps them.
"""

from __future__ import annotations

import collections
import math

from distgpt.planner.accuracy import PUBLISHED, MeasuredRun, Scored, calibrate_one, load_table, score_run, summarize
from distgpt.planner.efficiency import FITTED


def _line(label: str, scored: list[Scored]) -> str:
    s = summarize(scored)
    tau = "  n/a" if math.isnan(s.tau) else f"{s.tau:5.2f}"
    job = "" if math.isnan(s.job_tau) else f" (same job {s.job_tau:4.2f})"
    mem = f"  memory {s.memory_mean:5.1%} ({s.memory_rows})" if s.memory_rows else ""
    oom = f"  too big as distgpt runs it: {s.predicted_oom}" if s.predicted_oom else ""
    return (f"  {label:<28} {s.rows:4d} runs  step time |error| mean {s.step_mean:5.1%}  median {s.step_median:5.1%}"
            f"  max {s.step_max:5.1%}  tau {tau}{job}{mem}{oom}")


def report(runs: list[MeasuredRun]) -> None:
    """Print the accuracy of the catalog's figures on ``runs``."""
    scored = [score_run(r) for r in runs]
    by_split: dict[str, list[Scored]] = collections.defaultdict(list)
    by_type: dict[tuple[str, str], list[Scored]] = collections.defaultdict(list)
    for s in scored:
        by_split[s.run.split].append(s)
        by_type[(s.run.split, s.run.device)].append(s)
    print("uncalibrated (the catalog's fitted figures; a type without its own fit gets the generic ones):")
    for split in ("fit", "held_out"):
        if by_split.get(split):
            print(_line(split, by_split[split]))
            for (sp, dev), rows in sorted(by_type.items()):
                if sp == split:
                    own = "own fit" if dev in FITTED else "generic"
                    print(_line(f"  {dev} ({own})", rows))
    held = by_split.get("held_out", [])
    systems: dict[str, list[Scored]] = collections.defaultdict(list)
    for s in held:
        systems[s.run.measured_by].append(s)
    if len(systems) > 1:
        print("held out, by the system that measured them (the figures were fitted to one PyTorch FSDP system):")
        for name, rows in sorted(systems.items(), key=lambda kv: -len(kv[1])):
            print(_line(name, rows))
    for s in summarize(held, worst=3).worst if held else []:
        print(f"    worst held-out: {s.run.run}: predicted {s.step_time_s:.3g} s, measured {s.run.step_time_s:.3g} s")
    print("calibrated on one run of the type (its smallest; that run left out of the figures):")
    for dev in sorted({s.run.device for s in held}):
        small, model = calibrate_one(runs, dev)
        rest = [score_run(r, {dev: model}) for r in runs if r.device == dev and r.split == "held_out" and r != small]
        if rest:
            print(_line(f"{dev} (on {small.run})", rest))
    _calibrated_per_system(systems)


def _calibrated_per_system(systems: dict[str, list[Scored]]) -> None:
    """Each held-out system calibrated on its own smallest run of each type: what a user of that system gets from
    one short run of it (``bench hardware``, or a tune's refit)."""
    lines = []
    for name, rows in sorted(systems.items(), key=lambda kv: -len(kv[1])):
        mine = [s.run for s in rows]
        rest = []
        for dev in sorted({r.device for r in mine}):
            small, model = calibrate_one(mine, dev)
            rest += [score_run(r, {dev: model}) for r in mine if r.device == dev and r != small]
        if len(rest) >= 2:
            lines.append(_line(name, rest))
    if lines:
        print("held out, each system calibrated on its own smallest run of each type (that run left out):")
        print("\n".join(lines))


def print_fit(runs: list[MeasuredRun]) -> None:
    """Refit on the 'fit' rows and print the figures to keep in ``planner/efficiency.py``."""
    from distgpt.planner.efficiency_fit import START, fit, generic

    fitted = fit([r for r in runs if r.split == "fit"], START)
    print("FITTED = {")
    for dev, e in fitted.items():
        print(f'    "{dev}": Efficiency(gemm={e.gemm:.3f}, attention={e.attention:.3f}, width_half={e.width_half:.0f},'
              f' memory_passes={e.memory_passes:.2f}, kernel_s={e.kernel_s:g}),')
    g = generic(fitted)
    print("}")
    print(f"GENERIC = Efficiency(gemm={g.gemm:.3f}, attention={g.attention:.3f}, width_half={g.width_half:.0f}, "
          f"memory_passes={g.memory_passes:.2f}, kernel_s={g.kernel_s:g})")


def run(table: str | None, refit: bool) -> int:
    """Entry point of the command."""
    runs = load_table(table or PUBLISHED)
    print(f"{len(runs)} measured runs from {table or PUBLISHED}")
    if refit:
        print_fit(runs)
        return 0
    report(runs)
    return 0
