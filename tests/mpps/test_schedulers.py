"""EC schedulers: the curves of Figure 3, frozen epochs, courses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.mpps.schedulers import FullShare, Linear, Quad, Separ, StepN


def _check_shape(curve: list[float], start: int, end: int) -> None:
    assert all(0.0 <= v <= 1.0 for v in curve)
    assert all(a >= b for a, b in itertools.pairwise(curve)), curve  # never increases
    assert curve[: start + 1] == [1.0] * (start + 1)  # first course lengthened by the frozen epochs
    assert curve[len(curve) - end - 1 :] == [0.0] * (end + 1)  # last course likewise


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 40), fs=st.integers(0, 10), fe=st.integers(0, 10))
def test_linear_curve(m: int, fs: int, fe: int) -> None:
    sch = Linear(m + fs + fe, frozen=(fs, fe))
    curve = sch.curve()
    _check_shape(curve, fs, fe)
    mid = curve[fs : fs + m]
    steps = [a - b for a, b in itertools.pairwise(mid)]
    assert all(abs(s - 1.0 / (m - 1)) < 1e-12 for s in steps)  # one equal step per epoch
    courses = [sch.course(e) for e in range(sch.epochs)]
    assert len(set(courses)) == m  # a course per middle epoch
    assert curve == StepN(m + fs + fe, n=m, frozen=(fs, fe)).curve()  # Linear is StepN with N = M


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), extra=st.integers(0, 30), fs=st.integers(0, 6), fe=st.integers(0, 6))
def test_stepn_curve(n: int, extra: int, fs: int, fe: int) -> None:
    m = n + extra
    sch = StepN(m + fs + fe, n=n, frozen=(fs, fe))
    curve = sch.curve()
    _check_shape(curve, fs, fe)
    assert sorted(set(curve), reverse=True) == [1.0 - k / (n - 1) for k in range(n)]
    lengths = [sum(1 for j in range(m) if sch.course(fs + j) == k) for k in range(n)]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == m  # equal courses
    # the value changes exactly where the course changes
    for e in range(sch.epochs - 1):
        assert (curve[e] != curve[e + 1]) == (sch.course(e) != sch.course(e + 1))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 40), fs=st.integers(0, 5), fe=st.integers(0, 5))
def test_quad_curve(m: int, fs: int, fe: int) -> None:
    concave, convex = (
        Quad(m + fs + fe, (fs, fe)).curve(),
        Quad(m + fs + fe, (fs, fe), convex=True).curve(),
    )
    lin = Linear(m + fs + fe, (fs, fe)).curve()
    _check_shape(concave, fs, fe)
    _check_shape(convex, fs, fe)
    for j in range(m):
        s = j / (m - 1)
        assert abs(concave[fs + j] - (1 - s * s)) < 1e-12
        assert abs(convex[fs + j] - (1 - s) ** 2) < 1e-12
    assert all(c >= li - 1e-12 >= v - 2e-12 for c, li, v in zip(concave, lin, convex))


def test_constant_schedulers() -> None:
    assert Separ(5).curve() == [1.0] * 5 and FullShare(5).curve() == [0.0] * 5
    assert (
        {Separ(5).course(e) for e in range(5)} == {0} == {FullShare(5).course(e) for e in range(5)}
    )


def test_past_the_end_keeps_last_value() -> None:
    sch = Linear(4)
    assert sch(10) == sch(3) == 0.0 and sch.course(10) == sch.course(3)


def test_scheduler_bad_input() -> None:
    with pytest.raises(ValueError, match="epochs"):
        Linear(0)
    with pytest.raises(ValueError, match="at least 2"):
        Linear(5, frozen=2)
    with pytest.raises(ValueError, match="n "):
        StepN(10, n=1)
    with pytest.raises(ValueError, match="at least 4"):
        StepN(5, n=4, frozen=1)
    with pytest.raises(ValueError, match="frozen"):
        Linear(10, frozen=-1)
    with pytest.raises(ValueError, match="epoch"):
        Linear(10).value(-1)
