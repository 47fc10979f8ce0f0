"""Smoke tests of the loss-only route benchmark (benchmarks/loss_only_speed.py).

No timing is asserted: the script's core runs on tiny models (T = 2, one timed step per row) and
the tests check that every row runs, that the ``auto:`` rows take the loss-only (or layer) route
and give the loop's step, that ``auto:sum`` is bit-identical to ``sum(losses).backward()``, and
that the report and the command line work.
"""

from __future__ import annotations

import pytest
import torch

from ._helpers import load_benchmark

lo = load_benchmark("loss_only_speed")

TINY = lo.Config(models=("mlp", "convnet"), tasks=(2,), threads=(1,), mlp=(8, 16, 16), mlp_batch=8,
                 conv_batch=4, conv_size=8, conv_width=2, prime=2, rounds=2, steps=1, loop_rounds=1)


@pytest.fixture(scope="module")
def tiny_result():
    return lo.run(TINY)


def test_every_row_runs_and_takes_its_route(tiny_result):
    keys = lo.row_keys()
    assert len(tiny_result.rows) == 2 * len(keys)
    for r in tiny_result.rows:
        assert r.error is None, (r.model, r.key, r.error)
        assert r.wall_ms and all(t > 0 for t in r.wall_ms)
        if r.key.startswith("loop:"):
            assert r.capture == "loop" and len(r.wall_ms) == 1
        elif r.key.startswith("auto:"):
            assert r.capture == ("layer" if r.key == "auto:gradnorm" else "losses"), r.key
            assert len(r.wall_ms) == TINY.rounds * TINY.steps


def test_auto_rows_give_the_loop_step(tiny_result):
    for r in tiny_result.rows:
        if r.key == "auto:sum":
            assert r.rel_diff == 0.0  # the same graph as sum(losses).backward(): the same bits
        elif r.key.startswith("auto:"):
            assert r.rel_diff is not None and r.rel_diff < 1e-4, (r.model, r.key, r.rel_diff)


def test_report_and_goals(tiny_result):
    report = lo.format_report(tiny_result, "python benchmarks/loss_only_speed.py")
    assert "command: `python benchmarks/loss_only_speed.py`" in report
    for key in lo.row_keys():
        assert f"| {key} |" in report
    goals = lo.check_goals(tiny_result)
    assert len(goals) == 2 * (len(lo.LOSS_ONLY) + 1)
    assert all(("goal 1.15x" in g) != ("auto:gradnorm" in g) for g in goals)


def test_last_layer_columns_cover_the_last_layer():
    enc = lo.mlp_encoder([3, 4, 5])
    assert lo.last_layer_columns(enc) == (3 * 4 + 4, 3 * 4 + 4 + 4 * 5 + 5)
    conv = load_benchmark("step_speed").ConvNet(width=2)
    start, end = lo.last_layer_columns(conv)
    last_conv = [m for m in conv.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert end == sum(p.numel() for p in conv.parameters())
    assert end - start == last_conv.weight.numel() + 2 * last_conv.out_channels  # + BatchNorm


def test_cli():
    cfg, _ = lo.parse_args([])
    assert (cfg.models, cfg.tasks, cfg.threads, cfg.mlp, cfg.mlp_batch) == (
        ("mlp", "convnet"), (3, 10, 40), (1, 2), (256, 1024, 1024), 256)
    cfg, _ = lo.parse_args(["--models", "mlp", "--tasks", "10", "--threads", "1",
                            "--methods", "plain,auto:mean"])
    assert (cfg.models, cfg.tasks, cfg.methods) == (("mlp",), (10,), ("plain", "auto:mean"))
    with pytest.raises(ValueError, match="unknown methods"):
        lo.parse_args(["--methods", "plain,bogus"])
    with pytest.raises(SystemExit):
        lo.parse_args(["--models", "resnet"])
