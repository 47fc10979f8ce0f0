"""Shared matrix samplers and property asserts for the aggregator tests.

Samplers (hypothesis strategies, float64 ``[T, D]`` matrices):

* :func:`matrices`: full rank, or a given rank ``r < min(T, D)`` built as ``A @ B``.
* :func:`strongly_stationary_matrices`: 0 lies in the relative interior of the rows' convex
  hull (``g_T = -sum_k c_k g_k`` with every ``c_k > 0``).
* :func:`non_strongly_stationary_matrices`: every row is ``u + e_t`` with ``||e_t|| < ||u|| / 2``,
  so ``g_t . u > ||u||^2 / 2 > 0`` for all ``t`` and 0 is not in the hull.

Asserts (each takes an aggregator, or a zero-argument factory for one, and a matrix ``J``, and
returns the direction ``d = agg(J)``). The single-evaluation asserts call an instance as is; the
permutation and scaling asserts deep-copy it (or call the factory) before each evaluation, so
stateful and seeded methods see the same state and draws in every evaluation.
Tolerances are relative to :func:`scale_of` (the largest row norm).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import Aggregator

AggLike = Aggregator | Callable[[], Aggregator]

__all__ = [
    "assert_expected_structure",
    "assert_linear_under_scaling",
    "assert_non_conflicting",
    "assert_non_zero",
    "assert_permutation_invariant",
    "assert_strongly_stationary",
    "matrices",
    "non_strongly_stationary_matrices",
    "scale_of",
    "strongly_stationary_matrices",
]


# --------------------------------------------------------------------------- samplers


def _scale(draw, min_log_scale: float, max_log_scale: float) -> float:
    return 10.0 ** draw(st.floats(min_log_scale, max_log_scale))


@st.composite
def matrices(draw, min_tasks: int = 2, max_tasks: int = 6, rank: int | None = None,
             max_dim: int = 8, min_log_scale: float = -3, max_log_scale: float = 3,
             min_dim: int = 1, tall: bool = False) -> torch.Tensor:
    """A float64 ``[T, D]`` Gaussian matrix of full rank, or of rank ``rank < min(T, D)``;
    ``tall`` keeps ``D >= T`` (linearly independent rows when of full rank)."""
    lo = min_tasks if rank is None else max(min_tasks, rank + 1)
    assert lo <= max_tasks, "rank must be below max_tasks"
    T = draw(st.integers(lo, max_tasks))
    lo_d = max(min_dim, T if tall else 1, 1 if rank is None else rank + 1)
    D = draw(st.integers(lo_d, max(max_dim, lo_d)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if rank is None:
        J = rng.standard_normal((T, D))
    else:
        J = rng.standard_normal((T, rank)) @ rng.standard_normal((rank, D))
    return torch.tensor(J * _scale(draw, min_log_scale, max_log_scale), dtype=torch.float64)


@st.composite
def strongly_stationary_matrices(draw, min_tasks: int = 2, max_tasks: int = 6, max_dim: int = 8,
                                 min_log_scale: float = -3,
                                 max_log_scale: float = 3) -> torch.Tensor:
    """Rows ``g_1..g_{T-1}`` Gaussian and ``g_T = -sum_k c_k g_k`` with ``c_k`` in [0.2, 5]:
    ``0 = sum_k c_k g_k + g_T`` is a positive combination of all rows, i.e. 0 is in the relative
    interior of their convex hull."""
    T = draw(st.integers(max(2, min_tasks), max_tasks))
    D = draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    G = rng.standard_normal((T - 1, D))
    c = rng.uniform(0.2, 5.0, size=T - 1)
    J = np.vstack([G, -(c @ G)[None]])
    return torch.tensor(J * _scale(draw, min_log_scale, max_log_scale), dtype=torch.float64)


@st.composite
def non_strongly_stationary_matrices(draw, min_tasks: int = 2, max_tasks: int = 6,
                                     max_dim: int = 8, min_log_scale: float = -3,
                                     max_log_scale: float = 3) -> torch.Tensor:
    """Rows ``u + e_t`` with ``||e_t|| <= 0.45 ||u||``: ``g_t . u > 0`` for all t, so 0 is not
    in the rows' convex hull."""
    T = draw(st.integers(min_tasks, max_tasks))
    D = draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    E = rng.standard_normal((T, D))
    E *= (rng.uniform(0.0, 0.45, size=(T, 1)) / np.maximum(np.linalg.norm(E, axis=1, keepdims=True),
                                                           1e-300))
    J = u[None] + E
    return torch.tensor(J * _scale(draw, min_log_scale, max_log_scale), dtype=torch.float64)


# --------------------------------------------------------------------------- asserts


def scale_of(J: torch.Tensor) -> float:
    """The largest row norm of J (at least 1e-300): the scale of the tolerances."""
    return max(float(J.norm(dim=1).max()), 1e-300)


def _fresh(agg: AggLike) -> Aggregator:
    return copy.deepcopy(agg) if isinstance(agg, Aggregator) else agg()


def _run(agg: AggLike, J: torch.Tensor, losses: torch.Tensor | None = None,
         fresh: bool = False) -> torch.Tensor:
    """One evaluation; an instance is used as is (its weights and diagnostics stay readable)
    unless ``fresh``, when a deep copy of it (or the factory's product) is used."""
    if fresh or not isinstance(agg, Aggregator):
        agg = _fresh(agg)
    return agg(J, losses)


def assert_expected_structure(agg: AggLike, J: torch.Tensor,
                              losses: torch.Tensor | None = None) -> torch.Tensor:
    """``agg(J)`` has shape ``[D]``, the dtype of J, and is finite."""
    d = _run(agg, J, losses)
    assert d.shape == (J.shape[1],), (d.shape, J.shape)
    assert d.dtype == J.dtype, (d.dtype, J.dtype)
    assert bool(torch.isfinite(d).all()), d
    return d


def assert_non_conflicting(agg: AggLike, J: torch.Tensor, tol: float | None = None,
                           losses: torch.Tensor | None = None) -> torch.Tensor:
    """``agg(J)`` is finite and ``J @ d >= -tol`` (default ``1e-10 * s^2 * T``, s = scale_of(J))."""
    d = _run(agg, J, losses)
    assert bool(torch.isfinite(d).all()), d
    if tol is None:
        tol = 1e-10 * scale_of(J) ** 2 * J.shape[0]
    assert bool((J @ d >= -tol).all()), J @ d
    return d


def assert_permutation_invariant(agg: AggLike, J: torch.Tensor, rtol: float = 1e-9,
                                 perms: int | Sequence[Sequence[int]] = 3, seed: int = 0,
                                 losses: torch.Tensor | None = None) -> torch.Tensor:
    """``agg(J[perm]) == agg(J)`` up to ``rtol * scale_of(J)``, for ``perms`` random
    permutations (or the given ones); the losses, if any, are permuted alike."""
    d = _run(agg, J, losses, fresh=True)
    T = J.shape[0]
    if isinstance(perms, int):
        g = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(T, generator=g).tolist() for _ in range(perms)]
    for perm in perms:
        dp = _run(agg, J[list(perm)], None if losses is None else losses[list(perm)], fresh=True)
        assert torch.allclose(dp, d, rtol=0, atol=rtol * scale_of(J)), (perm, d, dp)
    return d


def assert_linear_under_scaling(agg: AggLike, J: torch.Tensor, rtol: float = 1e-9,
                                scales: Sequence[float] = (1e-3, 0.5, 7.0, 1e3),
                                losses: torch.Tensor | None = None) -> torch.Tensor:
    """``agg(c J) == c agg(J)`` for each ``c > 0`` in ``scales``, up to
    ``rtol * c * scale_of(J)``."""
    d = _run(agg, J, losses, fresh=True)
    for c in scales:
        dc = _run(agg, J * c, losses, fresh=True)
        assert torch.allclose(dc, c * d, rtol=0, atol=rtol * c * scale_of(J)), (c, c * d, dc)
    return d


def assert_strongly_stationary(agg: AggLike, J: torch.Tensor, rtol: float = 1e-7,
                               losses: torch.Tensor | None = None) -> torch.Tensor:
    """``agg(J) == 0`` up to ``rtol * scale_of(J)`` (for J with 0 in its rows' relative hull)."""
    d = _run(agg, J, losses)
    assert bool(torch.isfinite(d).all()), d
    assert float(d.norm()) <= rtol * scale_of(J), (float(d.norm()), scale_of(J))
    return d


def assert_non_zero(agg: AggLike, J: torch.Tensor, rtol: float = 1e-6,
                    losses: torch.Tensor | None = None) -> torch.Tensor:
    """``||agg(J)|| > rtol * scale_of(J)`` (for J whose rows' hull does not hold 0)."""
    d = _run(agg, J, losses)
    assert bool(torch.isfinite(d).all()), d
    assert float(d.norm()) > rtol * scale_of(J), (float(d.norm()), scale_of(J))
    return d
