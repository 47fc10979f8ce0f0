"""Smoke test of the MoCo digits benchmark (benchmarks/moco_digits.py): a shortened run of every
method prints the table; the data and the task targets are as documented."""

from __future__ import annotations

import time

import pytest
import torch

from ._helpers import load_benchmark

pytest.importorskip("sklearn")


def test_tasks_and_split() -> None:
    md = load_benchmark("moco_digits")
    Xtr, Ytr, Xte, _ = md.load(0)
    assert Xtr.shape[1] == 64 and Xtr.shape[0] + Xte.shape[0] == 1797
    assert float(Xtr.max()) <= 1.0 and float(Xtr.min()) >= 0.0
    d = Ytr[:, 0]
    assert torch.equal(Ytr[:, 1], d % 2) and torch.equal(Ytr[:, 2], (d >= 5).long())


def test_shortened_run_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    md = load_benchmark("moco_digits")
    t0 = time.perf_counter()
    out = md.main(["--seeds", "0", "--epochs", "1", "--max-steps", "15"])
    assert time.perf_counter() - t0 < 10
    printed = capsys.readouterr().out
    assert out in printed
    for name in ("sum", "mgda", "moco", "moco-old", "moco-libmtl"):
        assert f"| {name} |" in out
    assert "test acc. digit" in out


def test_old_defaults_reachable() -> None:
    md = load_benchmark("moco_digits")
    old, new = md.METHODS["moco-old"](), md.METHODS["moco"]()
    assert (old.beta, old.beta_sigma) == (0.5, 0.5)
    assert (new.beta, new.beta_sigma) == (0.9, 0.0)
