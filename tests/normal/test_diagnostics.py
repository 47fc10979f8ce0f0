"""Task relatedness from positions: distance matrix, grouping, history."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.normal import PositionHistory, distance_matrix, group_positions

positions_st = st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)


@settings(max_examples=40, deadline=None)
@given(p=positions_st)
def test_distance_matrix_is_a_metric_on_positions(p):
    D = distance_matrix(p)
    T = p.shape[0]
    for i, j in itertools.product(range(T), repeat=2):
        assert D[i, j].item() == abs(p[i].item() - p[j].item())  # brute force
    assert torch.equal(D, D.T) and (D.diagonal() == 0).all()
    # shifting every position keeps the distances (only relative positions matter)
    assert torch.allclose(distance_matrix(p + 3.25), D, atol=1e-9)


def _single_linkage(p: list[float], k: int) -> list[list[int]]:
    """Agglomerative single linkage on |p_i - p_j|, merging the closest clusters until k remain."""
    clusters = [[i] for i in range(len(p))]
    while len(clusters) > k:
        best = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            dist = min(abs(p[i] - p[j]) for i in clusters[a] for j in clusters[b])
            if best is None or dist < best[0]:
                best = (dist, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return sorted((sorted(c) for c in clusters), key=lambda c: min(p[i] for i in c))


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 10_000), min_size=1, max_size=7, unique=True),
    perm_seed=st.integers(0, 1000),
    k=st.integers(1, 8),
)
def test_group_positions_is_single_linkage(gaps, perm_seed, k):
    # distinct gaps make single linkage unique
    vals = [0.0]
    for g in gaps:
        vals.append(vals[-1] + g / 100.0)
    perm = torch.randperm(len(vals), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    p = [vals[i] for i in perm]
    k = min(k, len(p))
    assert group_positions(torch.tensor(p, dtype=torch.float64), k) == _single_linkage(p, k)


def test_group_positions_bad_input():
    with pytest.raises(ValueError, match="num_groups"):
        group_positions(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match=r"shape \[T\]"):
        distance_matrix(torch.zeros(2, 2))


def test_history_roundtrip():
    h = PositionHistory()
    assert h.as_tensor().shape == (0, 0)
    for s in range(4):
        h.record(torch.tensor([s * 0.1, -s * 0.2]))
    h2 = PositionHistory()
    h2.load_state_dict(h.state_dict())
    assert torch.equal(h2.as_tensor(), h.as_tensor()) and len(h2) == 4
    with pytest.raises(ValueError, match="changed shape"):
        h.record(torch.zeros(3))
    with pytest.raises(ValueError):
        h2.load_state_dict({"positions": torch.zeros(3)})
