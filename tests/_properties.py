"""Property asserts shared by the aggregators' and weightings' tests.

Each test file draws matrices from the samplers of :mod:`tests.strategies` with Hypothesis and
calls these asserts on them, so that a file reads as the list of properties its method has.
The properties and their names follow Quinton and Rey, *Jacobian Descent for Multi-Objective
Optimization* (arXiv:2406.16232, 2024), for an aggregator ``A`` mapping ``J`` ([T, D], rows
``g_t``) to a direction ``d``:

* expected structure: ``d`` has shape ``[D]`` and ``J``'s dtype, and is finite; the weights, when
  the method has them, are ``[T]``, finite, and give ``d = w^T J``;
* non-conflicting: ``J A(J) >= 0`` (no task's loss increases to first order);
* permutation invariance: ``A(P J) = A(J)`` for a row permutation ``P`` (and the weights are
  permuted with the rows);
* positive homogeneity: ``A(c J) = c A(J)`` for ``c > 0``;
* linearity under scaling: ``c -> A(diag(c) J)`` is linear on ``c > 0`` (stronger: it implies
  positive homogeneity);
* stationarity: ``J`` is strongly stationary when ``v^T J = 0`` for some ``v > 0`` (0 in the
  relative interior of the convex hull of the rows), weakly stationary when ``v^T J = 0`` for
  some ``v >= 0, v != 0`` (0 in the hull: Pareto-stationary).  Some methods return 0 there
  (:func:`assert_zero_direction` on such a ``J``).  An aggregator is strongly stationary when
  ``A(J) = 0`` only for a strongly stationary ``J``, checked through the contrapositive
  (:func:`assert_nonzero_direction` on any other ``J``).

The ``agg`` argument of an assert is an aggregator instance (called as it is, so its
``weights`` and ``diagnostics`` stay readable afterwards) or a zero-argument factory (a class,
a lambda).  The asserts that compare several evaluations (permutation, scaling) evaluate each
on a fresh instance: the factory's product or a deep copy of the instance, so stateful and
seeded methods start every evaluation from the same state and draws.  Tolerances are explicit:
each test states the accuracy it expects, in the units of its inputs (see :func:`scale_of`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torch_mtlgrad.aggregators import Aggregation, Aggregator

__all__ = [
    "AggLike",
    "assert_close",
    "assert_expected_structure",
    "assert_finite_on_degenerate_matrices",
    "assert_linear_under_scaling",
    "assert_loss_scale_free",
    "assert_non_conflicting",
    "assert_nonzero_direction",
    "assert_permutation_invariant",
    "assert_positively_homogeneous",
    "assert_state_dict_roundtrip",
    "assert_weighted",
    "assert_zero_direction",
    "fresh",
    "permutation_gap",
    "scale_of",
]

AggLike = Aggregator | Callable[[], Aggregator]
Step = tuple[Tensor, Tensor | None]  # (J, losses) of one call
Steps = Tensor | Step | Sequence[Tensor | Step]
WeightsOf = Callable[[Aggregator], Tensor]


def scale_of(J: Tensor) -> float:
    """The largest row norm of J (at least 1e-300): the scale of the tolerances."""
    return max(float(J.norm(dim=1).max()), 1e-300)


def fresh(agg: AggLike) -> Aggregator:
    """A new instance: a deep copy of ``agg``, or what the factory ``agg`` builds."""
    return copy.deepcopy(agg) if isinstance(agg, Aggregator) else agg()


def _instance(agg: AggLike) -> Aggregator:
    return agg if isinstance(agg, Aggregator) else agg()


def _steps(steps: Steps) -> list[Step]:
    """One call (``J``, or a tuple ``(J, losses)``) or a list of them, as ``(J, losses)`` pairs."""
    if isinstance(steps, Tensor):
        return [(steps, None)]
    if isinstance(steps, tuple):
        return [steps]  # type: ignore[list-item]
    return [(s, None) if isinstance(s, Tensor) else s for s in steps]


def _perms(perms: int | Sequence[int] | Sequence[Sequence[int]] | Tensor, T: int,
           seed: int) -> list[Tensor]:
    """``perms`` permutations of ``range(T)`` from a seeded generator, or the one or several
    given."""
    if isinstance(perms, int):
        g = torch.Generator().manual_seed(seed)
        return [torch.randperm(T, generator=g) for _ in range(perms)]
    perms = torch.as_tensor(perms, dtype=torch.long)
    return [perms] if perms.dim() == 1 else list(perms)


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float = 0.0, atol: float = 0.0,
                 norm: bool = False, msg: Any = None) -> None:
    """``|actual - expected| <= atol + rtol |expected|`` element by element (``torch.allclose``),
    or with ``norm=True`` in the Euclidean norm: ``||actual - expected|| <= atol +
    rtol ||expected||``."""
    if norm:
        err = float((actual - expected).norm())
        bound = atol + rtol * float(expected.norm())
        assert err <= bound + 1e-300, (msg, actual, expected, err, bound)
    else:
        assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
            msg, actual, expected, float((actual - expected).abs().max()))


# --- Structure -------------------------------------------------------------------------------


def assert_expected_structure(agg: AggLike, J: Tensor, losses: Tensor | None = None, *,
                              weights_rtol: float = 1e-4, weights_atol: float | None = None
                              ) -> Aggregation:
    """One ``aggregate(J, losses)``: ``d`` is ``[D]``, in ``J``'s dtype and finite; the weights
    (when not ``None``) are ``[T]``, finite, the ones ``agg.weights`` reports, and give
    ``w^T J = d`` to ``weights_rtol`` and ``weights_atol`` (default ``1e-5`` times the sum of the
    row norms); every diagnostic is a tensor.  Returns the aggregation."""
    agg = _instance(agg)
    T, D = J.shape
    out = agg.aggregate(J, losses)
    d = out.direction
    assert d is not None
    assert d.shape == (D,) and d.dtype == J.dtype, (d.shape, J.shape, d.dtype, J.dtype)
    assert bool(torch.isfinite(d).all()), (J, d)
    w = out.weights
    if w is not None:
        assert w.shape == (T,) and bool(torch.isfinite(w).all()), w
        assert agg.weights is not None and torch.equal(agg.weights, w)
        atol = 1e-5 * float(J.norm(dim=1).sum()) if weights_atol is None else weights_atol
        assert torch.allclose(w.to(J.dtype) @ J, d, rtol=weights_rtol, atol=atol), (w, d)
    for v in out.diagnostics.values():
        assert isinstance(v, Tensor)
    return out


def assert_finite_on_degenerate_matrices(make: Callable[[int], Aggregator],
                                         matrices: Sequence[Tensor], calls: int = 3) -> None:
    """A fresh ``make(T)`` per matrix, called ``calls`` times in a row (stateful methods: the
    later calls too): every direction is finite, and the all-zero matrix gives exactly 0."""
    for J in matrices:
        agg = make(J.shape[0])
        for _ in range(calls):
            d = agg(J)
            assert bool(torch.isfinite(d).all()), (agg, J, d)
        if not bool(J.any()):
            assert bool((d == 0).all()), (agg, d)


def assert_weighted(agg: Aggregator, J: Tensor, d: Tensor, *, rtol: float = 0.0,
                    atol: float) -> None:
    """The last call's weights describe its direction: ``agg.weights^T J = d``."""
    assert agg.weights is not None
    assert torch.allclose(agg.weights @ J, d, rtol=rtol, atol=atol), (agg.weights @ J, d)


# --- Non-conflicting -------------------------------------------------------------------------


def assert_non_conflicting(agg: AggLike | Tensor, J: Tensor, losses: Tensor | None = None, *,
                           rtol: float = 0.0, atol: float | None = None) -> Tensor:
    """``d = agg(J, losses)`` (or ``agg`` itself, a direction already computed) is finite and
    ``g_t . d >= -tol_t`` for every row, ``tol_t = atol + rtol ||g_t|| (||d|| + max_k
    ||g_k||)`` (the rounding of ``g_t . d`` scales with ``||g_t||``).  Without either tolerance,
    ``atol = 1e-10 T max_k ||g_k||^2``.  Returns ``d``."""
    d = agg if isinstance(agg, Tensor) else _instance(agg)(J, losses)
    assert bool(torch.isfinite(d).all()), d
    if atol is None:
        atol = 1e-10 * scale_of(J) ** 2 * J.shape[0] if rtol == 0.0 else 0.0
    norms = J.norm(dim=1)
    tol = atol + rtol * norms * (d.norm() + norms.max())
    assert bool((J @ d >= -tol).all()), (J @ d, tol)
    return d


# --- Invariances -----------------------------------------------------------------------------


def assert_permutation_invariant(agg: AggLike, steps: Steps,
                                 perms: int | Sequence[int] | Sequence[Sequence[int]] | Tensor = 3,
                                 *, rtol: float = 0.0, atol: float = 0.0, norm: bool = False,
                                 permuted: AggLike | None = None, weights: WeightsOf | None = None,
                                 weights_rtol: float = 0.0, weights_atol: float = 0.0,
                                 seed: int = 0) -> tuple[Aggregator, Aggregator]:
    """For each permutation (``perms`` of them drawn from a generator seeded with ``seed``, or
    the ones given): two fresh instances on the same steps, the second (from ``permuted`` when
    the method's own arguments must be permuted too) with the rows of every ``J`` and the
    losses permuted; every step gives a finite direction, the same for both (:func:`assert_close`
    with ``rtol``, ``atol``, ``norm``), and, when ``weights`` reads them, finite weights with
    ``w_a[perm] = w_b``.  Returns the two instances of the last permutation."""
    steps = _steps(steps)
    for perm in _perms(perms, steps[0][0].shape[0], seed):
        a, b = fresh(agg), fresh(permuted or agg)
        for k, (J, L) in enumerate(steps):
            da = a(J, L)
            db = b(J[perm], None if L is None else L[perm])
            assert bool(torch.isfinite(da).all()), (J, da)
            assert_close(da, db, rtol=rtol, atol=atol, norm=norm, msg=("direction", perm, k))
            if weights is not None:
                wa, wb = weights(a), weights(b)
                assert bool(torch.isfinite(wa).all()), wa
                assert_close(wa[perm], wb, rtol=weights_rtol, atol=weights_atol,
                             msg=("weights", perm, k))
    return a, b


def permutation_gap(agg: AggLike, J: Tensor, perms: int = 3, seed: int = 0) -> float:
    """The largest ``max |A(J) - A(P J)|`` over ``perms`` seeded row permutations ``P`` (fresh
    instances each), in ``J``'s dtype: how much the order of the tasks moves the direction, for
    tests that bound it at the rounding level of the input's dtype."""
    d = fresh(agg)(J)
    gap = 0.0
    for perm in _perms(perms, J.shape[0], seed):
        dp = fresh(agg)(J[perm])
        assert dp.dtype == J.dtype and bool(torch.isfinite(dp).all()), dp
        gap = max(gap, float((d - dp).abs().max()))
    return gap


def assert_positively_homogeneous(agg: AggLike, J: Tensor, scales: float | Sequence[float], *,
                                  rtol: float = 0.0, atol: float = 0.0, norm: bool = False,
                                  losses: Tensor | None = None) -> None:
    """``A(c J) = c A(J)`` for each ``c > 0`` in ``scales`` (fresh instances), compared with
    :func:`assert_close` as ``actual = A(c J)``, ``expected = c A(J)``, tolerances
    ``rtol`` and ``c * atol`` (``atol`` is in the units of ``A(J)``)."""
    d = fresh(agg)(J, losses)
    for c in ([scales] if isinstance(scales, (int, float)) else scales):
        assert c > 0
        dc = fresh(agg)(J * c, losses)
        assert_close(dc, c * d, rtol=rtol, atol=atol * c, norm=norm, msg=("scale", c))


def assert_linear_under_scaling(agg: AggLike, steps: Steps, c1: Tensor, c2: Tensor, *,
                                atol: float, rtol: float = 0.0, alpha: float = 1.0,
                                beta: float = 1.0) -> None:
    """``A(diag(alpha c1 + beta c2) J) = alpha A(diag(c1) J) + beta A(diag(c2) J)`` for positive
    row scalings ``c1``, ``c2`` and ``alpha, beta > 0``: three fresh instances over the same
    steps, every step compared element by element."""
    assert bool((c1 > 0).all()) and bool((c2 > 0).all()) and alpha > 0 and beta > 0
    c = alpha * c1 + beta * c2
    x, x1, x2 = fresh(agg), fresh(agg), fresh(agg)
    for k, (J, L) in enumerate(_steps(steps)):
        lhs = x(J * c[:, None], L)
        rhs = alpha * x1(J * c1[:, None], L) + beta * x2(J * c2[:, None], L)
        assert_close(lhs, rhs, rtol=rtol, atol=atol, msg=("step", k))


def assert_loss_scale_free(agg: AggLike, steps: Sequence[Step], factor: float, *, rtol: float,
                           atol: float = 0.0) -> None:
    """Multiplying every loss by ``factor > 0`` changes no weight: two fresh instances over the
    same steps, the second with the losses scaled."""
    a, c = fresh(agg), fresh(agg)
    for k, (J, L) in enumerate(steps):
        assert L is not None
        a(J, L)
        c(J, L * factor)
        assert_close(a.weights, c.weights, rtol=rtol, atol=atol, msg=("step", k))


# --- Stationarity ----------------------------------------------------------------------------


def assert_zero_direction(agg: AggLike, J: Tensor, losses: Tensor | None = None, *,
                          rtol: float = 1e-10) -> Tensor:
    """``d = agg(J)`` is finite and ``||d|| <= rtol max_t ||g_t||``: 0 up to rounding (for a
    stationary ``J``, where the method returns 0)."""
    d = _instance(agg)(J, losses)
    assert bool(torch.isfinite(d).all()), d
    assert float(d.norm()) <= rtol * scale_of(J), (float(d.norm()), scale_of(J))
    return d


def assert_nonzero_direction(agg: AggLike, J: Tensor, losses: Tensor | None = None, *,
                             rtol: float = 1e-6) -> Tensor:
    """``d = agg(J)`` is finite and ``||d|| > rtol max_t ||g_t||``: clearly non-zero (for a
    ``J`` that is not stationary, where the method returns 0 only at stationary points)."""
    d = _instance(agg)(J, losses)
    assert bool(torch.isfinite(d).all()), d
    assert float(d.norm()) > rtol * scale_of(J), (float(d.norm()), scale_of(J))
    return d


# --- State -----------------------------------------------------------------------------------


def assert_state_dict_roundtrip(make: Callable[[], Aggregator], seed: int, steps: int, split: int,
                                shape: tuple[int, int] = (3, 4)) -> tuple[Aggregator, Aggregator]:
    """Run ``split`` of ``steps`` random steps (``J`` of ``shape``, losses in [0.1, 2]), load
    the state into a fresh instance, and check both give identical outputs on the rest;
    returns the two instances."""
    rng = np.random.default_rng(seed)
    data = [(torch.tensor(rng.standard_normal(shape)), torch.tensor(rng.uniform(0.1, 2, shape[0])))
            for _ in range(steps)]
    a = make()
    for J, L in data[:split]:
        a(J, L)
    b = make()
    b.load_state_dict(a.state_dict())
    for J, L in data[split:]:
        assert torch.equal(a(J, L), b(J, L))
    return a, b
