"""Matrix samplers: Hypothesis strategies for task Jacobians ``J`` ([T, D], float64).

* :func:`jacobians` draws one of several hard structures (random, rank 1, low rank, duplicate,
  colinear or opposite rows, a zero row, orthogonal rows) at a scale ``10**s``.
* :func:`improvable_matrices` (rows with a common improving direction, at very different
  scales: Nash-MTL's domain) and :func:`independent_row_matrices` (``T <= D`` Gaussian rows).
* Gaussian families, at a scale ``10**s``: :func:`gaussian_matrices` (full rank, or rank
  ``r`` as a product ``A @ B``), :func:`cancelling_row_matrices` (the last row cancels a
  positive combination of the others: strongly stationary) and
  :func:`common_direction_matrices` (rows ``u + e_t`` with ``||e_t|| < ||u|| / 2``: every row
  has ``g_t . u > 0``, so 0 is not in their hull).
* The controlled samplers draw ``J = U S V^T`` with exact rank ``r`` (``U``, ``V`` Haar
  orthonormal, singular values in ``[0.1, 10]`` so the rank is numerically clear), and a chosen
  position of 0 relative to the convex hull of the rows:

  - :func:`full_rank_matrices` (``r = min(T, D)``) and :func:`rank_deficient_matrices`
    (``r < min(T, D)``);
  - :func:`strongly_stationary_matrices`: ``v^T J = 0`` for some ``v > 0``, i.e. 0 is in the
    relative interior of the convex hull of the rows;
  - :func:`strictly_weakly_stationary_matrices`: ``v^T J = 0`` for some ``v >= 0, v != 0`` but
    for no ``v > 0`` (0 on the relative boundary of the hull);
  - :func:`non_weakly_stationary_matrices`: 0 is not in the hull (a common descent direction
    exists);
  - :func:`non_strongly_stationary_matrices`: either of the last two;
  - :func:`zero_row_matrices`: some rows exactly 0;
  - :func:`controlled_matrices`: any of these.

* :func:`presence_patterns` (a plain function, not a strategy): seeded per-step masks of the
  tasks present (at least one each), for the tests of absent tasks.

  The definitions of strong and weak stationarity are Quinton and Rey's (*Jacobian Descent for
  Multi-Objective Optimization*, arXiv:2406.16232, 2024).  For stationarity ``J`` is made
  orthogonal to ``v`` on the left; against it, a positive left singular vector ``u`` with a
  positive singular value ``s`` rules out any ``v >= 0, v != 0`` with ``v^T J = 0`` (else
  ``0 = v^T J J^T u = s^2 v^T u > 0``).

Every sampler draws a seed and builds the matrix with NumPy's generator, so the examples are
as repeatable as Hypothesis's (the derandomized profile is set in the repository's conftest).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume
from hypothesis import strategies as st

from torch_mtlgrad.aggregators._solvers import min_norm_weights

__all__ = [
    "DEGENERATE_MATRICES",
    "KINDS",
    "POSITIVE_SCALES",
    "cancelling_row_matrices",
    "common_direction_matrices",
    "controlled_matrices",
    "full_rank_matrices",
    "gaussian_matrices",
    "improvable_matrices",
    "independent_row_matrices",
    "jacobians",
    "non_strongly_stationary_matrices",
    "non_weakly_stationary_matrices",
    "presence_patterns",
    "rank_deficient_matrices",
    "strictly_weakly_stationary_matrices",
    "strongly_stationary_matrices",
    "zero_row_matrices",
]

KINDS = ("random", "rank1", "low_rank", "duplicate", "colinear", "opposite", "zero_row", "orthogonal")


@st.composite
def jacobians(draw, min_tasks: int = 2, max_tasks: int = 8, max_dim: int = 12,
              min_log_scale: float = -8, max_log_scale: float = 8, kinds=KINDS) -> torch.Tensor:
    """A float64 [T, D] matrix of one of several hard structures, times 10**s."""
    T = draw(st.integers(min_tasks, max_tasks))
    D = draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.floats(min_log_scale, max_log_scale))
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((T, D))
    if kind == "rank1":
        J = rng.standard_normal((T, 1)) * rng.standard_normal((1, D))
    elif kind == "low_rank":
        r = max(1, min(T, D) // 2)
        J = rng.standard_normal((T, r)) @ rng.standard_normal((r, D))
    elif kind == "duplicate":
        J[-1] = J[0]
    elif kind == "colinear":
        J[-1] = 3.7 * J[0]
    elif kind == "opposite":
        J[-1] = -J[0]
    elif kind == "zero_row":
        J[rng.integers(T)] = 0.0
    elif kind == "orthogonal" and D >= T:
        q, _ = np.linalg.qr(rng.standard_normal((D, T)))
        J = q.T * rng.uniform(0.1, 10, size=(T, 1))
    return torch.tensor(J * scale, dtype=torch.float64)


# --- Gaussian families -----------------------------------------------------------------------


def _scale(draw, min_log_scale: float, max_log_scale: float) -> float:
    return 10.0 ** draw(st.floats(min_log_scale, max_log_scale))


@st.composite
def gaussian_matrices(draw, min_tasks: int = 2, max_tasks: int = 6, rank: int | None = None,
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
def cancelling_row_matrices(draw, min_tasks: int = 2, max_tasks: int = 6, max_dim: int = 8,
                            min_log_scale: float = -3, max_log_scale: float = 3) -> torch.Tensor:
    """Strongly stationary: rows ``g_1..g_{T-1}`` Gaussian and ``g_T = -sum_k c_k g_k`` with
    ``c_k`` in [0.2, 5], so ``0 = sum_k c_k g_k + g_T`` is a positive combination of all the
    rows (0 is in the relative interior of their convex hull)."""
    T = draw(st.integers(max(2, min_tasks), max_tasks))
    D = draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    G = rng.standard_normal((T - 1, D))
    c = rng.uniform(0.2, 5.0, size=T - 1)
    J = np.vstack([G, -(c @ G)[None]])
    return torch.tensor(J * _scale(draw, min_log_scale, max_log_scale), dtype=torch.float64)


@st.composite
def common_direction_matrices(draw, min_tasks: int = 2, max_tasks: int = 6, max_dim: int = 8,
                              min_log_scale: float = -3, max_log_scale: float = 3) -> torch.Tensor:
    """Not weakly stationary: rows ``u + e_t`` (``||u|| = 1``) with ``||e_t|| <= 0.45``, so
    ``g_t . u > 0`` for all t and 0 is not in the rows' convex hull."""
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


# --- Method-specific families ----------------------------------------------------------------


@st.composite
def improvable_matrices(draw, min_tasks: int = 2, max_tasks: int = 8, max_dim: int = 8,
                        row_scales: bool = True,
                        kinds: tuple[str, ...] = ("spread", "duplicate", "low_rank", "zero_row")
                        ) -> torch.Tensor:
    """[T, D] float64 with a common improving direction (rows v + noise, or duplicate, low-rank
    or zero-row variants), rows scaled by 10**U(-6, 6); kept only when clearly not
    Pareto-stationary (the min-norm point of the unit rows' hull has squared norm > 1e-6)."""
    T = draw(st.integers(min_tasks, max_tasks))
    D = draw(st.integers(2, max_dim))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    v = rng.standard_normal(D)
    v /= np.linalg.norm(v)
    J = rng.standard_normal((T, D)) * draw(st.floats(0.1, 2.0)) + v
    if kind == "duplicate":
        J[-1] = J[0]
    elif kind == "low_rank" and D > 2:
        J = J @ np.outer(v, v) + 0.3 * (J @ np.eye(D)[:, :1]) * np.eye(D)[:1]
        J = J + v  # stays improvable along v
    elif kind == "zero_row":
        J[rng.integers(T)] = 0.0
    if row_scales:
        J = J * 10.0 ** rng.uniform(-6, 6, size=(T, 1))
    U = J / np.maximum(np.linalg.norm(J, axis=1, keepdims=True), 1e-300)
    U = U[np.linalg.norm(J, axis=1) > 0]
    Ct = torch.tensor(U @ U.T)
    w = min_norm_weights(Ct)
    assume(float(w @ Ct @ w) > 1e-6)  # clearly improvable (not near Pareto-stationary)
    return torch.tensor(J)


@st.composite
def independent_row_matrices(draw: st.DrawFn) -> torch.Tensor:
    """T <= D random rows (independent with probability 1), scaled by 10^s."""
    T = draw(st.integers(2, 5))
    D = draw(st.integers(T, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return torch.tensor(rng.standard_normal((T, D)) * 10.0 ** draw(st.floats(-3, 3)))


# --- Controlled rank and stationarity ---------------------------------------------------------


def _orthonormal_complement(Q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random [m, m - k] matrix with orthonormal columns orthogonal to Q's (Q: [m, k],
    orthonormal columns): [Q, Q'] is orthogonal."""
    m, k = Q.shape
    A = rng.standard_normal((m, m - k))
    A = A - Q @ (Q.T @ A)
    Qc, _ = np.linalg.qr(A)
    return Qc


def _orthonormal(m: int, rng: np.random.Generator) -> np.ndarray:
    return _orthonormal_complement(np.zeros((m, 0)), rng)


def _assemble(U: np.ndarray, D: int, r: int, rng: np.random.Generator,
              scale: float) -> torch.Tensor:
    """U[:, :r] S V[:, :r]^T with singular values in [0.1, 10] (log-uniform), times scale."""
    S = 10.0 ** rng.uniform(-1, 1, size=r)
    V = _orthonormal(D, rng)
    return torch.tensor((U[:, :r] * S) @ V[:, :r].T * scale, dtype=torch.float64)


def _shape_seed_scale(draw, min_tasks: int, max_tasks: int, min_dim: int, max_dim: int,
                      min_log_scale: float,
                      max_log_scale: float) -> tuple[int, int, np.random.Generator, float]:
    T = draw(st.integers(min_tasks, max_tasks))
    D = draw(st.integers(min_dim, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** draw(st.floats(min_log_scale, max_log_scale))
    return T, D, rng, scale


@st.composite
def full_rank_matrices(draw, min_tasks: int = 1, max_tasks: int = 8, min_dim: int = 1,
                       max_dim: int = 12, min_log_scale: float = -8,
                       max_log_scale: float = 8) -> torch.Tensor:
    """[T, D] of rank min(T, D), singular values in 10**s * [0.1, 10]."""
    T, D, rng, scale = _shape_seed_scale(draw, min_tasks, max_tasks, min_dim, max_dim,
                                         min_log_scale, max_log_scale)
    return _assemble(_orthonormal(T, rng), D, min(T, D), rng, scale)


@st.composite
def rank_deficient_matrices(draw, min_tasks: int = 2, max_tasks: int = 8, min_dim: int = 2,
                            max_dim: int = 12, min_log_scale: float = -8,
                            max_log_scale: float = 8) -> torch.Tensor:
    """[T, D] of rank r, 1 <= r < min(T, D) (so T, D >= 2), singular values in
    10**s * [0.1, 10] (the other ones exactly 0)."""
    T, D, rng, scale = _shape_seed_scale(draw, max(min_tasks, 2), max_tasks, max(min_dim, 2),
                                         max_dim, min_log_scale, max_log_scale)
    r = draw(st.integers(1, min(T, D) - 1))
    return _assemble(_orthonormal(T, rng), D, r, rng, scale)


@st.composite
def strongly_stationary_matrices(draw, min_tasks: int = 2, max_tasks: int = 8, min_dim: int = 1,
                                 max_dim: int = 12, min_log_scale: float = -8,
                                 max_log_scale: float = 8) -> torch.Tensor:
    """[T, D] with v^T J = 0 for a v > 0 (entries of v / max v in [0.1, 1]): 0 is a
    combination of all the rows with positive weights.  Rank 1 <= r <= min(T - 1, D)."""
    T, D, rng, scale = _shape_seed_scale(draw, max(min_tasks, 2), max_tasks, min_dim, max_dim,
                                         min_log_scale, max_log_scale)
    r = draw(st.integers(1, min(T - 1, D)))
    v = rng.uniform(0.1, 1.0, size=T)
    U = _orthonormal_complement((v / np.linalg.norm(v))[:, None], rng)
    return _assemble(U, D, r, rng, scale)


@st.composite
def strictly_weakly_stationary_matrices(draw, min_tasks: int = 2, max_tasks: int = 8,
                                        min_dim: int = 1, max_dim: int = 12,
                                        min_log_scale: float = -8,
                                        max_log_scale: float = 8) -> torch.Tensor:
    """[T, D] with v^T J = 0 for a v >= 0, v != 0, and for no v > 0.  Rank 1 <= r <=
    min(T - 1, D).

    Split the tasks in two non-empty groups; v (support: the first group) and v' (the second)
    are non-negative and orthogonal.  J is orthogonal to v on the left and has v' as a left
    singular vector with a positive singular value, so any w > 0 has w^T J J^T v' =
    s^2 w^T v' > 0: no w > 0 cancels the rows."""
    T, D, rng, scale = _shape_seed_scale(draw, max(min_tasks, 2), max_tasks, min_dim, max_dim,
                                         min_log_scale, max_log_scale)
    r = draw(st.integers(1, min(T - 1, D)))
    split = draw(st.integers(1, T - 1))
    order = rng.permutation(T)
    u = rng.uniform(0.1, 1.0, size=T)
    v, v2 = np.zeros(T), np.zeros(T)
    v[order[:split]] = u[order[:split]]
    v2[order[split:]] = u[order[split:]]
    V1 = np.stack([v / np.linalg.norm(v), v2 / np.linalg.norm(v2)], axis=1)
    U = np.concatenate([V1[:, 1:], _orthonormal_complement(V1, rng)], axis=1)  # v' first, no v
    J = _assemble(U, D, r, rng, scale)
    if split == 1:  # v = e_t: row t is 0 (exactly, not up to the rounding of the complement)
        J[order[0]] = 0.0
    return J


@st.composite
def non_weakly_stationary_matrices(draw, min_tasks: int = 1, max_tasks: int = 8,
                                   min_dim: int = 1, max_dim: int = 12,
                                   min_log_scale: float = -8,
                                   max_log_scale: float = 8) -> torch.Tensor:
    """[T, D] whose rows' convex hull does not contain 0: a positive u (entries of u / max u in
    [0.1, 1]) is a left singular vector with a positive singular value.  Rank 1 <= r <=
    min(T, D)."""
    T, D, rng, scale = _shape_seed_scale(draw, min_tasks, max_tasks, min_dim, max_dim,
                                         min_log_scale, max_log_scale)
    r = draw(st.integers(1, min(T, D)))
    u = rng.uniform(0.1, 1.0, size=T)
    u1 = (u / np.linalg.norm(u))[:, None]
    U = np.concatenate([u1, _orthonormal_complement(u1, rng)], axis=1)
    return _assemble(U, D, r, rng, scale)


def non_strongly_stationary_matrices(min_tasks: int = 2, max_tasks: int = 8, min_dim: int = 1,
                                     max_dim: int = 12, min_log_scale: float = -8,
                                     max_log_scale: float = 8) -> st.SearchStrategy[torch.Tensor]:
    """Strictly weakly stationary or not weakly stationary: no v > 0 has v^T J = 0."""
    kw = {"min_tasks": min_tasks, "max_tasks": max_tasks, "min_dim": min_dim, "max_dim": max_dim,
          "min_log_scale": min_log_scale, "max_log_scale": max_log_scale}
    return st.one_of(strictly_weakly_stationary_matrices(**kw),
                     non_weakly_stationary_matrices(**kw))


def controlled_matrices(min_tasks: int = 2, max_tasks: int = 8, min_dim: int = 1,
                        max_dim: int = 12, min_log_scale: float = -8,
                        max_log_scale: float = 8) -> st.SearchStrategy[torch.Tensor]:
    """Any of the controlled samplers: full rank, rank-deficient, with zero rows, strongly,
    strictly weakly or not weakly stationary."""
    kw = {"min_tasks": min_tasks, "max_tasks": max_tasks, "min_dim": min_dim, "max_dim": max_dim,
          "min_log_scale": min_log_scale, "max_log_scale": max_log_scale}
    return st.one_of(full_rank_matrices(**kw), rank_deficient_matrices(**kw),
                     zero_row_matrices(**kw), strongly_stationary_matrices(**kw),
                     strictly_weakly_stationary_matrices(**kw),
                     non_weakly_stationary_matrices(**kw))


@st.composite
def zero_row_matrices(draw, min_tasks: int = 2, max_tasks: int = 8, min_dim: int = 1,
                      max_dim: int = 12, min_log_scale: float = -8,
                      max_log_scale: float = 8) -> torch.Tensor:
    """A full-rank or rank-deficient [T, D] matrix with 1 to T rows set exactly to 0."""
    T, D, rng, scale = _shape_seed_scale(draw, max(min_tasks, 1), max_tasks, min_dim, max_dim,
                                         min_log_scale, max_log_scale)
    r = draw(st.integers(1, min(T, D)))
    J = _assemble(_orthonormal(T, rng), D, r, rng, scale)
    zero = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T, unique=True))
    J[zero] = 0.0
    return J


# Fixed matrices with zero, opposite or equal rows (float32): the all-zero matrix, zero rows
# around a non-zero one, an opposite pair, an equal pair.
DEGENERATE_MATRICES = (
    torch.zeros(3, 5),
    torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]),
    torch.tensor([[1.0, 2.0], [-1.0, -2.0]]),
    torch.tensor([[1.0, 2.0], [1.0, 2.0]]),
)

# Fixed positive factors, from small to large, for the positive-homogeneity checks.
POSITIVE_SCALES = (1e-3, 0.5, 7.0, 1e3)


def presence_patterns(seed: int, steps: int, num_tasks: int, p_present: float = 0.6,
                      first_absent: int | None = 0) -> list[torch.Tensor]:
    """``steps`` bool masks ``[num_tasks]`` (each task present with probability ``p_present``,
    at least one present per step), from a seeded generator.  With ``first_absent=t`` task ``t``
    is absent at the first step (so its state is first made later), and every pattern that is
    drawn all-True is kept as it is (the plain call mixed in)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        m = rng.random(num_tasks) < p_present
        if k == 0 and first_absent is not None:
            m[first_absent] = False
        if not m.any():
            m[rng.integers(num_tasks if k or first_absent is None else num_tasks - 1)] = True
            if k == 0 and first_absent is not None and m[first_absent]:
                m[first_absent] = False
                m[(first_absent + 1) % num_tasks] = True
        out.append(torch.from_numpy(m))
    return out
