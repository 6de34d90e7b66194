"""bench/launcher_interleave.py: steps are credited to the window they ended in, and the ratio pairs windows."""

from __future__ import annotations

import pytest

from distgpt.bench.launcher_interleave import _report, window_medians


def test_steps_count_in_the_window_they_ended_in_and_sparse_windows_are_left_out():
    stamps = [(10.0 + 0.1 * i, 0.05) for i in range(20)] + [(20.0 + 0.1 * i, 0.08) for i in range(20)]
    stamps += [(30.0, 0.5), (30.1, 0.5)]  # only two steps in the third window
    assert window_medians(stamps, [(10.0, 12.0), (20.0, 22.0), (29.5, 31.0)]) == [
        pytest.approx(0.05), pytest.approx(0.08), None]


def test_the_report_pairs_windows_and_needs_two(capsys):
    assert _report([0.05, 0.06, None], [0.05, 0.054, 0.05]) == 0
    out = capsys.readouterr().out
    assert "2 adjacent pairs" in out and "range 0.900–1.000" in out
    assert _report([0.05, None], [0.05, 0.05]) == 1
