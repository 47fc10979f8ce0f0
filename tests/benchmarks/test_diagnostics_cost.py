"""Smoke tests of the diagnostics-cost benchmark (benchmarks/diagnostics_cost.py): the script's
core on a tiny MLP (T = 2, one timed step per row); no timing is asserted."""

from __future__ import annotations

import pytest

from ._helpers import load_benchmark

dc = load_benchmark("diagnostics_cost")

TINY = dc.Config(tasks=(2,), threads=(1,), mlp=(8, 16), mlp_batch=8, prime=1, rounds=2, steps=1,
                 isolated=2)


@pytest.fixture(scope="module")
def tiny_result():
    return dc.run(TINY)


def test_rows_routes_and_equal_steps(tiny_result):
    assert [r.key for r in tiny_result.rows] == dc.keys(dc.METHODS)
    for r in tiny_result.rows:
        assert r.error is None, (r.key, r.error)
        assert len(r.wall_ms) == TINY.rounds * TINY.steps
        method, setting = r.key.split(":")
        # mean builds J only for diagnostics="full"; the Gramian methods always do (the CPU loop).
        want = "losses" if method == "mean" and setting != "full" else "loop"
        assert r.capture == want, r.key
        if setting != "off":
            assert r.rel_diff is not None and r.rel_diff < 1e-5, (r.key, r.rel_diff)
    assert set(tiny_result.isolated) == {(1, 2)}


def test_report_and_goals(tiny_result):
    report = dc.format_report(tiny_result, "python benchmarks/diagnostics_cost.py")
    assert "step_diagnostics alone" in report
    goals = dc.check_goals(tiny_result)
    assert len(goals) == 3
    assert sum("goal <= 5%" in g for g in goals) == 2


def test_cli():
    cfg, _ = dc.parse_args([])
    assert (cfg.tasks, cfg.threads, cfg.methods) == ((10,), (1,), dc.METHODS)
    with pytest.raises(SystemExit):
        dc.parse_args(["--methods", "pcgrad"])
