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

