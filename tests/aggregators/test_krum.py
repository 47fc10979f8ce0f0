"""Krum and Multi-Krum (Blanchard et al., *Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent*, NeurIPS 2017): against a float64 NumPy re-derivation of the scores from the
rows themselves (not from G), against TorchJD 0.18 (which sums distances, not squared distances:
equal weights wherever both scorings select the same rows, ours the paper's where they differ),
the paper's resilience (far adversarial rows, colluding or not, are never selected when
n >= 2f + 3), ties, the input checks; the shared properties: expected structure, Gramian-only,
permutation invariance of the weights, positive homogeneity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.krum import Krum, krum_scores

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import DEGENERATE_MATRICES, POSITIVE_SCALES, gaussian_matrices, jacobians
from ..test_capture import forbid_host_sync


def reference_scores(J: np.ndarray, f: int, squared: bool = True) -> np.ndarray:
    """s(i) = sum over the n - f - 2 closest other rows of ||g_i - g_j||^2 (or ||g_i - g_j||)."""
    n = J.shape[0]
    k = n - f - 2
    out = np.zeros(n)
    for i in range(n):
        dist = sorted(float(np.sum((J[i] - J[j]) ** 2)) for j in range(n) if j != i)
        if not squared:
            dist = [np.sqrt(x) for x in dist]
        out[i] = sum(dist[:max(k, 0)])
    return out


def reference_weights(scores: np.ndarray, m: int) -> np.ndarray | None:
    """1/m on the m smallest scores; None when the m-th and (m+1)-th are too close to call."""
    order = np.argsort(scores, kind="stable")
    if m < len(scores) and scores[order[m]] - scores[order[m - 1]] <= 1e-9 * max(scores.max(), 1):
        return None
    w = np.zeros(len(scores))
    w[order[:m]] = 1.0 / m
    return w


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=3, max_tasks=9, max_dim=8, min_log_scale=-4, max_log_scale=4,
                   kinds=("random", "low_rank", "orthogonal")), data=st.data())
def test_matches_reference(J: torch.Tensor, data: st.DataObject) -> None:
    n = J.shape[0]
    f = data.draw(st.integers(0, (n - 3) // 2))
    m = data.draw(st.integers(1, n))
    ref_s = reference_scores(J.numpy(), f)
    w_ref = reference_weights(ref_s, m)
    assume(w_ref is not None)
    agg = Krum(n_byzantine=f, n_selected=m)
    d = agg(J)
    assert np.allclose(agg.diagnostics["scores"].numpy(), ref_s, rtol=1e-9,
                       atol=1e-9 * scale_of(J) ** 2)
    assert np.array_equal(agg.weights.numpy(), w_ref)
    assert np.allclose(d.numpy(), w_ref @ J.numpy(), rtol=1e-12, atol=1e-14 * scale_of(J))


def test_against_torchjd() -> None:
    """Same weights as TorchJD's Krum wherever its scores (sums of distances) select the same
    rows as the paper's (sums of squared distances); where they select different rows, ours are
    the paper's."""
    tj = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(0)
    same = differ = 0
    worst = 0.0
    for _ in range(300):
        n = int(rng.integers(3, 10))
        f = int(rng.integers(0, (n - 3) // 2 + 1))
        m = int(rng.integers(1, n - f + 1))
        J = torch.tensor(rng.standard_normal((n, 5)) * rng.uniform(0.2, 3.0, size=(n, 1)))
        w_sq = reference_weights(reference_scores(J.numpy(), f), m)
        w_lin = reference_weights(reference_scores(J.numpy(), f, squared=False), m)
        if w_sq is None or w_lin is None:
            continue
        ours = Krum(n_byzantine=f, n_selected=m)
        d = ours(J)
        theirs = tj.Krum(n_byzantine=f, n_selected=m)(J)
        if np.array_equal(w_sq, w_lin):
            same += 1
            worst = max(worst, float((d - theirs).abs().max()))
            assert torch.allclose(d, theirs, rtol=1e-12, atol=1e-14)
        else:
            differ += 1
            assert np.array_equal(ours.weights.numpy(), w_sq)
            assert np.allclose(theirs.numpy(), w_lin @ J.numpy())
    assert same > 100 and differ > 0 and worst < 1e-13, (same, differ, worst)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_far_adversaries_are_never_selected(data: st.DataObject) -> None:
    """Honest rows within radius r of a centre, f adversarial rows at distance >= R from every
    honest row (anywhere, possibly all equal: colluding), n >= 2f + 3.  Each honest score is
    at most k (2r)^2 (k = n - f - 2 honest neighbours exist); an adversary counts at least
    k - (f - 1) >= 2 honest neighbours, so its score is at least 2 R^2: with 2 R^2 > k (2r)^2
    only honest rows are selected (Multi-Krum with m <= n - f too)."""
    f = data.draw(st.integers(1, 3))
    n = data.draw(st.integers(2 * f + 3, 2 * f + 6))
    m = data.draw(st.integers(1, n - f))
    D = data.draw(st.integers(2, 6))
    collude = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    r, k = 1.0, n - f - 2
    R = 1.01 * np.sqrt(k / 2) * 2 * r
    centre = rng.standard_normal(D) * 3
    noise = rng.standard_normal((n - f, D))
    radii = rng.uniform(0, r, (n - f, 1))
    honest = centre + noise / np.linalg.norm(noise, axis=1, keepdims=True) * radii
    u = rng.standard_normal((f, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    far = centre + u * (r + R) * rng.uniform(1.0, 50.0, (f, 1))
    if collude:
        far[:] = far[0]
    J = np.vstack([honest, far])
    perm = rng.permutation(n)
    agg = Krum(n_byzantine=f, n_selected=m)
    agg(torch.tensor(J[perm]))
    w = agg.weights.numpy()
    bad = perm >= n - f  # where the adversarial rows went
    assert np.all(w[bad] == 0) and abs(w.sum() - 1) < 1e-12, (w, bad)


def test_ties_and_small_n() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for n in (1, 2, 3, 5):
        agg = Krum()
        d = agg(g.expand(n, -1).clone())  # equal rows: all tied, every one shares the weight
        assert torch.allclose(d, g, rtol=1e-15) and torch.allclose(agg.weights,
                                                                     torch.full((n,), 1.0 / n,
                                                                                dtype=g.dtype))
    # Two rows (f = 0: no neighbour counted): the mean, whatever the order.
    J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert torch.equal(Krum()(J), J.mean(dim=0))
    # A duplicated pair tied for the best score: they share it.
    J = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    agg = Krum()
    agg(J)
    assert agg.weights.tolist() == [0.5, 0.5, 0.0, 0.0]
    agg = Krum(n_selected=3)
    agg(J)
    assert torch.allclose(agg.weights, torch.tensor([1, 1, 1, 0], dtype=J.dtype) / 3)
    G = J @ J.T
    assert krum_scores(G, 0).tolist() == [1.0, 1.0, 2.0, 91.0]  # 2 neighbours each
    assert krum_scores(G, 1).tolist() == [0.0, 0.0, 1.0, 41.0]  # 1 neighbour
    assert krum_scores(G, 2).tolist() == [0.0] * 4  # none


def test_input_checks() -> None:
    J = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"needs at least 2 \* 1 \+ 3 = 5 rows .* got 4"):
        Krum(n_byzantine=1)(J)
    with pytest.raises(ValueError, match="n_selected=5. needs at least 5 rows"):
        Krum(n_selected=5)(J)
    for kw in ({"n_byzantine": -1}, {"n_byzantine": 1.0}, {"n_selected": True}):
        with pytest.raises(ValueError, match="must be a non-negative int"):
            Krum(**kw)
    with pytest.raises(ValueError, match="n_selected must be at least 1"):
        Krum(n_selected=0)
    assert repr(get("krum", n_byzantine=1)) == "Krum(n_byzantine=1, n_selected=1)"
    assert get("krum").reads == "gramian" and Krum.gramian_only


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=8, max_dim=10, min_log_scale=-6, max_log_scale=6),
       m=st.integers(1, 3))
def test_expected_structure(J: torch.Tensor, m: int) -> None:
    m = min(m, J.shape[0])
    for dtype in (torch.float64, torch.float32):
        out = assert_expected_structure(Krum(n_selected=m), J.to(dtype))
        assert bool((out.weights >= 0).all()) and abs(float(out.weights.sum()) - 1) < 1e-6


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: Krum(), DEGENERATE_MATRICES)


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_tasks=3, max_tasks=7))
def test_gramian_only(J: torch.Tensor) -> None:
    """The same weights for J and J Q (Q orthogonal): the same Gramian up to rounding."""
    Q, _ = torch.linalg.qr(torch.randn(J.shape[1], J.shape[1], dtype=J.dtype,
                                       generator=torch.Generator().manual_seed(0)))
    s = reference_scores(J.numpy(), 0)
    assume(reference_weights(s, 1) is not None)
    a, b = Krum(), Krum()
    a(J)
    b(J @ Q)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.aggregate_gramian(J @ J.T).weights, a.weights)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=8, max_dim=8), m=st.integers(1, 3))
def test_permutation_invariant(J: torch.Tensor, m: int) -> None:
    """Weights permute with the rows, ties included (duplicate, colinear and zero rows)."""
    m = min(m, J.shape[0])
    assert_permutation_invariant(lambda: Krum(n_selected=m), J, 4, rtol=1e-12,
                                 atol=1e-12 * scale_of(J), weights=lambda a: a.weights)


@settings(max_examples=25, deadline=None)
@given(K=gaussian_matrices(min_tasks=3, max_tasks=7))
def test_positively_homogeneous(K: torch.Tensor) -> None:
    assert_positively_homogeneous(lambda: Krum(), K, POSITIVE_SCALES, rtol=1e-14,
                                  atol=1e-15 * scale_of(K))


def test_no_host_synchronisation() -> None:
    """Scores, the m-th smallest and the tie rule stay tensor operations (CPU stand-in for
    torch.cuda.set_sync_debug_mode('error'))."""
    J = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    for agg in (Krum(), Krum(n_byzantine=1, n_selected=2)):
        with forbid_host_sync():
            out = agg.aggregate(J, check_finite=False)
        assert out.weights is not None and abs(float(out.weights.sum()) - 1) < 1e-6
