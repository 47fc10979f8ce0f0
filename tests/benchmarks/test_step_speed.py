"""Smoke and correctness tests of the step-speed benchmark (benchmarks/step_speed.py).

No timing is asserted: the tests run the script's core on a tiny model (T = 2, 2 timed steps)
and check that every method produces a row, that the exact capture modes give the loop's
gradient, that the LibMTL-style Frank-Wolfe solver reaches the min-norm optimum (checked against
the library's exact solver), and that the CPU peak-memory measurement sees an allocation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators._solvers import min_norm_weights

from ._helpers import load_benchmark

ss = load_benchmark("step_speed")

TINY = ss.Config(tasks=(2,), batch=4, size=8, model="convnet", width=2, steps=2, warmup=1,
                 device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops on a loaded 2-core machine: one thread avoids OpenMP barrier stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_result():
    return ss.run_benchmark(TINY)


def test_every_method_has_a_row(tiny_result):
    keys = [m.key for m in ss.methods()]
    assert [r.key for r in tiny_result.rows] == keys
    assert all(r.T == 2 for r in tiny_result.rows)
    jd = ss.torchjd_version() is not None
    for r in tiny_result.rows:
        if r.key.startswith("torchjd:") and not jd:
            assert r.error == "torchjd not installed"
            continue
        assert r.error is None, f"{r.key}: {r.error}"
        assert len(r.times_ms) == TINY.steps
        assert all(math.isfinite(t) and t > 0 for t in r.times_ms)


def test_exact_modes_match_the_loop(tiny_result):
    exact = {m.key for m in ss.methods() if m.family == "ours" and m.exact and m.ref is not None}
    checked = 0
    for r in tiny_result.rows:
        if r.key in exact:
            assert r.rel_diff is not None, r.key
            assert r.rel_diff < 1e-4, (r.key, r.rel_diff)
            checked += 1
    assert checked >= 6
    # The peers compute MGDA too (approximately, Frank-Wolfe): same direction to a loose tolerance.
    libmtl = next(r for r in tiny_result.rows if r.key == "libmtl:mgda")
    assert libmtl.rel_diff is not None and libmtl.rel_diff < 0.1


def test_report_has_every_row_and_the_bars(tiny_result):
    table = ss.format_table(tiny_result)
    for m in ss.methods():
        assert m.label in table
    assert table.count("\n| 2 |") == len(ss.methods())
    bars = ss.check_bars(tiny_result)
    assert any("representation:mgda" in b for b in bars)
    assert any("auto:mgda vs torchjd:mgda" in b or "time auto:mgda" in b for b in bars)
    report = ss.format_report(tiny_result, "python benchmarks/step_speed.py")
    assert "command: `python benchmarks/step_speed.py`" in report


def test_methods_filter_and_unknown_key():
    res = ss.run_benchmark(ss.Config(tasks=(2,), batch=2, size=8, model="convnet", width=2, steps=1,
                                     warmup=0, device="cpu", methods=("sum", "loop:mgda")))
    assert [r.key for r in res.rows] == ["sum", "loop:mgda"]
    with pytest.raises(ValueError, match="unknown methods"):
        ss.select_methods(["nope"])


def test_cli_presets():
    cfg, _ = ss.parse_args([])
    assert (cfg.tasks, cfg.batch, cfg.size, cfg.model, cfg.steps) == ((3, 10, 40), 64, 64, "auto", 20)
    cfg, _ = ss.parse_args(["--quick", "--batch", "8", "--tasks", "3,10"])
    assert (cfg.model, cfg.batch, cfg.size, cfg.tasks) == ("convnet", 8, 32, (3, 10))
    with pytest.raises(SystemExit):
        ss.parse_args(["--steps", "0"])
    with pytest.raises(ValueError):
        ss.parse_args(["--methods", "sum,bogus"])


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 6), D=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_frank_wolfe_reaches_the_min_norm_optimum(T, D, seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, D, generator=g, dtype=torch.float64)
    G = J @ J.T
    w = ss.frank_wolfe_min_norm(G, max_iter=5000, stop=1e-12)
    assert torch.all(w >= -1e-12) and abs(float(w.sum()) - 1) < 1e-9
    w_exact = min_norm_weights(G, "auto")
    f, f_exact = float(w @ G @ w), float(w_exact @ G @ w_exact)
    scale = float(torch.diagonal(G).max())
    assert f >= f_exact - 1e-9 * scale
    assert f - f_exact <= 1e-3 * scale


def test_peak_memory_sees_an_allocation():
    mem = ss.PeakMemory(torch.device("cpu"))
    mem.start()
    if mem.baseline_kib is None:
        pytest.skip("/proc/self/clear_refs cannot be written here")
    x = torch.ones(16 * 2**20)  # 64 MiB, written so its pages are resident
    x.add_(1)
    del x
    peak = mem.stop()
    assert peak is not None and 48 <= peak <= 64 * 4


def test_loss_only_rows_take_the_loss_only_route(tiny_result):
    # auto:mean / auto:dwa run without J (the note names the route) and give the loop's step.
    for key in ("auto:mean", "auto:dwa"):
        r = next(r for r in tiny_result.rows if r.key == key)
        assert r.error is None, r.error
        assert "'losses'" in r.note, r.note
        assert r.rel_diff is not None and r.rel_diff < 1e-4, (key, r.rel_diff)
    bars = ss.check_bars(tiny_result)
    assert any("auto:mean (loss-only route)" in b for b in bars)
