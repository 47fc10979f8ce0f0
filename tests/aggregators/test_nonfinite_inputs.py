"""One policy for non-finite inputs, for every registry name called on its own: a NaN or inf in
``J``, ``G`` or the losses raises ``NonFiniteError`` (a ``FloatingPointError`` and a
``ValueError``) naming the task by its index among all tasks (also with ``present=``), before any
state changes (``state_dict`` before == after, the random generators included); and
``check_finite=False`` (or the attribute ``agg.check_finite = False``) skips the check, nested
calls (the tensioner's base) included."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from torch_mtlgrad._checks import NonFiniteError
from torch_mtlgrad.aggregators import Aggregator, available, get
from torch_mtlgrad.aggregators._base import check_finite_input
from torch_mtlgrad.aggregators._registry import needs_validation

T, D = 4, 5
# Methods that read a validation batch (Auto-Lambda) are checked in their own files.
NAMES = [n for n in available() if not needs_validation(n)]
RANDOM = {"rlw", "pcgrad", "graddrop", "gradvac"}
NAN, INF = float("nan"), float("inf")
PRESENT = [True, False, True, True]  # rows 0, 1, 2 of J are tasks 0, 2, 3


def build(name: str, T_total: int = T) -> Aggregator:
    base = name.split("+")[0]
    kw: dict[str, Any] = {}
    if base == "constant":
        kw["weights"] = torch.linspace(0.5, 2.0, T_total, dtype=torch.float64)
    if base in RANDOM:
        kw["seed"] = 3
    if name.endswith("+tension"):
        kw["window"] = 2
    return get(name, **kw)


def data(seed: int, rows: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, D, generator=g, dtype=torch.float64),
            torch.rand(rows, generator=g, dtype=torch.float64) + 0.1)


def warm(agg: Aggregator) -> None:
    """A few finite calls, so that stateful methods have state (and the tensioner's window is
    past) when the bad call comes."""
    for s in range(3):
        agg.aggregate(*data(s))


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of state dicts (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def bad_call_keeps_state(agg: Aggregator, call, match: str) -> None:
    before = agg.state_dict()
    with pytest.raises(NonFiniteError, match=match):
        call()
    assert same(before, agg.state_dict()), agg


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_row_of_J_names_the_task(name: str, value: float) -> None:
    agg = build(name)
    warm(agg)
    J, L = data(7)
    J[2, 1] = value
    bad_call_keeps_state(agg, lambda: agg.aggregate(J, L), r"J is not finite .* at task 2 \(row 2")
    # present=: row 1 of J is task 2 (task 1 is absent).
    Jp, Lp = data(8, rows=3)
    Jp[1, 0] = value
    bad_call_keeps_state(agg, lambda: agg.aggregate(Jp, Lp, present=PRESENT),
                         r"at task 2 \(row 1 of J\)")
    # The method still works on finite input afterwards.
    assert bool(torch.isfinite(agg.aggregate(*data(9)).direction).all())


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_loss_names_the_task(name: str) -> None:
    agg = build(name)
    warm(agg)
    J, L = data(7)
    L[3] = NAN
    bad_call_keeps_state(agg, lambda: agg.aggregate(J, L), r"losses are not finite .* at task 3")
    Jp, Lp = data(8, rows=3)
    Lp[2] = INF
    bad_call_keeps_state(agg, lambda: agg.aggregate(Jp, Lp, present=PRESENT),
                         r"at task 3 \(value 2 of losses\)")


@pytest.mark.parametrize("name", NAMES)
def test_gramian_and_loss_routes(name: str) -> None:
    agg = build(name)
    warm(agg)
    J, L = data(7)
    J[1] = NAN
    if agg.from_gramian:
        G = J @ J.T  # row 1 of J NaN: G's row and column 1 are NaN; the diagonal blames task 1
        bad_call_keeps_state(agg, lambda: agg.aggregate_gramian(G, L),
                             r"G is not finite .* at task 1 \(row 1 of G\)")
        Jp, Lp = data(8, rows=3)
        Jp[2] = INF
        bad_call_keeps_state(agg, lambda: agg.aggregate_gramian(Jp @ Jp.T, Lp, present=PRESENT),
                             r"at task 3 \(row 2 of G\)")
    if agg.reads == "losses":
        L2 = L.clone()
        L2[0] = NAN
        bad_call_keeps_state(agg, lambda: agg.aggregate_losses(L2, num_tasks=T),
                             r"losses are not finite .* at task 0")
        Lp = torch.tensor([1.0, INF, 2.0], dtype=torch.float64)
        bad_call_keeps_state(agg, lambda: agg.aggregate_losses(Lp, num_tasks=T, present=PRESENT),
                             r"at task 2 \(value 1 of losses\)")


def _unchecked(call) -> None:
    """Without the check, whatever the method's arithmetic makes of the NaN (a NaN direction, or
    an error of its own), but never the check's error."""
    try:
        call()
    except NonFiniteError:
        raise
    except Exception:  # noqa: BLE001, S110 - the method's own reaction to NaN is not specified
        pass


@pytest.mark.parametrize("name", NAMES)
def test_check_finite_false_skips_the_check(name: str) -> None:
    J, L = data(7)
    J[1, 1] = NAN
    agg = build(name)
    warm(agg)
    _unchecked(lambda: agg.aggregate(J, L, check_finite=False))
    agg = build(name)
    warm(agg)
    agg.check_finite = False  # the instance attribute
    _unchecked(lambda: agg.aggregate(J, L))
    if agg.from_gramian:
        _unchecked(lambda: build(name).aggregate_gramian(J @ J.T, L, check_finite=False))
    if agg.reads == "losses":
        L2 = L.clone()
        L2[0] = NAN
        _unchecked(lambda: build(name).aggregate_losses(L2, num_tasks=T, check_finite=False))


def test_unchecked_mean_is_nan_and_checked_is_default() -> None:
    J = torch.tensor([[1.0, 0.0], [NAN, 1.0]])
    for name in ("mean", "mgda", "cagrad", "alignedmtl", "dualproj", "upgrad", "nashmtl"):
        with pytest.raises(NonFiniteError, match=r"task 1 \(row 1 of J\)"):
            get(name)(J)
    d = get("mean").aggregate(J, check_finite=False).direction
    assert bool(d[0].isnan()) and float(d[1]) == 0.5


def test_the_check_synchronises_once_and_not_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is one ``isfinite(...).all()`` per input; with check_finite=False no check runs
    at all, also not in the tensioner's call of its base."""
    import torch_mtlgrad.aggregators._base as base

    calls: list[str] = []

    def spy(x: torch.Tensor, what: str, mask: torch.Tensor | None = None) -> None:
        calls.append(what)
        check_finite_input(x, what, mask)

    monkeypatch.setattr(base, "check_finite_input", spy)
    J, L = data(0)
    agg = get("mgda+tension", window=1)
    for _ in range(3):
        agg.aggregate(J, L)
    assert calls == ["J", "losses"] * 3  # the base (mgda) is not checked again
    calls.clear()
    for _ in range(3):
        agg.aggregate(J, L, check_finite=False)
    get("mean").aggregate_losses(L, num_tasks=T, check_finite=False)
    get("upgrad").aggregate_gramian(J @ J.T, check_finite=False)
    assert calls == []


def test_rescaled_forwards_check_finite() -> None:
    try:
        agg = get("mean*T")
    except ValueError:
        pytest.skip("no '*T' names in this registry")
    J = torch.tensor([[1.0, 0.0], [NAN, 1.0]])
    with pytest.raises(NonFiniteError, match="task 1"):
        agg.aggregate(J)
    d = agg.aggregate(J, check_finite=False).direction
    assert d is not None and bool(d[0].isnan())
