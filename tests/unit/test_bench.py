"""The benches' own statistics (no benchmark runs here)."""

from __future__ import annotations

import pytest


def test_paired_bench_ratio_and_its_interval():
    """bench parallel's statistic: the geometric mean of reference/distgpt time over rounds, with a 95% t-interval
    that narrows as agreeing rounds accumulate and stays wide while they disagree."""
    from distgpt.bench.parallel_worker import ratio_interval

    ratio, half = ratio_interval([(1.0, 1.0)] * 6)
    assert ratio == pytest.approx(1.0) and half == pytest.approx(0.0)
    ratio, half = ratio_interval([(0.9, 1.0), (1.1, 1.0)])
    assert ratio == pytest.approx((0.9 * 1.1) ** 0.5) and half > 0.5  # two rounds, t = 12.7
    steady = ratio_interval([(0.95, 1.0), (0.96, 1.0)] * 10)
    assert steady[0] == pytest.approx(0.955, abs=1e-3) and steady[1] < 0.01



def test_calibration_splits_each_mechanism_into_per_micro_batch_and_per_step_costs(tmp_path, monkeypatch):
    """``bench hardware``'s second phase, with the two-rank runs replaced by known (micro-batches, extra s, extra
    bytes) points: the profile keeps its device key, gets a + b·n split per mechanism, and a mechanism whose runs
    fail is left out with a warning (the planner would otherwise trust the bare formulas for it)."""
    from distgpt.bench import hardware
    from distgpt.planner.calibrate import DeviceProfile, load_profile, save_profile

    out = str(tmp_path / "p.json")
    save_profile(out, {"A100-80GB": DeviceProfile(((128.0, 1e14),), 1e11, 1e-5, 0.0, 1.0, 1e9, 8e10)}, {})
    seen = []

    def point(job, args, devices, steps, tmp, key):
        seen.append((key, args))
        if "--plan.pp=2" in args:
            return "a run failed"
        n = 4 if args[-1] == "--plan.micro_batch_size=2" else 2  # 8 samples: 4 or 2 micro-batches
        return n, 0.001 * n + 0.005, 1e6  # 1 ms per micro-batch, 5 ms per step

    monkeypatch.setattr(hardware, "_mechanism_point", point)
    monkeypatch.setattr(hardware, "speed_reference", lambda: 0.01)
    hardware.calibrate_mechanisms(out, "jobs/bench-parallel.toml", [])
    prof = load_profile(out)["A100-80GB"]
    assert dict(prof.engine_time)["ddp"] == pytest.approx(0.001) and "pp" not in dict(prof.engine_time)
    assert dict(prof.engine_step_time)["fsdp"] == pytest.approx(0.005)
    assert all(key == "A100-80GB" and "--plan.dtype='bf16'" in args for key, args in seen)  # a GPU calibrates bf16
