"""GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020, eq. 1 and Algorithm 1) against an element-by-element float64 reference
with the same uniform draws, and against TorchJD 0.18; then its properties, with the same draws:
expected structure, positive homogeneity, permutation invariance (the purity of eq. 1 and the
per-coordinate draws ignore the order of the tasks), a non-zero direction when the tasks share a
descent direction.  (Not non-conflicting, not linear under scaling: the purity reads the
magnitudes.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators.graddrop import GradDrop, sign_purity

from .._properties import (
    assert_expected_structure,
    assert_finite_on_degenerate_matrices,
    assert_nonzero_direction,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    scale_of,
)
from ..strategies import (
    DEGENERATE_MATRICES,
    POSITIVE_SCALES,
    common_direction_matrices,
    gaussian_matrices,
    jacobians,
)


def graddrop_reference(J: torch.Tensor, U: torch.Tensor, leak: list[float],
                       f: Callable[[float], float] = lambda p: p) -> torch.Tensor:
    """Algorithm 1 element by element, in Python floats."""
    T, D = J.shape
    out = torch.zeros(D, dtype=torch.float64)
    for k in range(D):
        col = [float(J[i, k]) for i in range(T)]
        total = sum(abs(x) for x in col)
        P = 0.5 * (1 + sum(col) / total) if total > 0 else 0.5
        fp, u = f(P), float(U[k])
        acc = 0.0
        for i, g in enumerate(col):
            M = (1.0 if (fp > u and g > 0) else 0.0) + (1.0 if (fp < u and g < 0) else 0.0)
            acc += (leak[i] + (1 - leak[i]) * M) * g
        out[k] = acc
    return out


@settings(max_examples=40, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=12, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), leak_kind=st.sampled_from(["zero", "scalar", "per-task"]),
       square=st.booleans())
def test_matches_elementwise_reference(J: torch.Tensor, seed: int, leak_kind: str,
                                       square: bool) -> None:
    T, D = J.shape
    if leak_kind == "zero":
        leak_arg, leak = 0.0, [0.0] * T
    elif leak_kind == "scalar":
        leak_arg, leak = 0.25, [0.25] * T
    else:
        leak = [t / max(T - 1, 1) for t in range(T)]
        leak_arg = leak
    f = (lambda p: p * p) if square else None
    d = GradDrop(f=f, leak=leak_arg, seed=seed)(J)
    U = torch.rand(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = graddrop_reference(J, U, leak, f if f is not None else (lambda p: p))
    scale = float(J.abs().sum(0).max())
    assert float((d - ref).abs().max()) <= 1e-12 * scale, (d, ref)


@settings(max_examples=30, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, min_log_scale=-3, max_log_scale=3),
       seed=st.integers(0, 2**31 - 1))
def test_each_element_takes_one_sign(J: torch.Tensor, seed: int) -> None:
    """Without leak, d_k is the sum of the positive parts or of the negative parts (or 0)."""
    d = GradDrop(seed=seed)(J)
    pos, neg = J.clamp_min(0).sum(0), J.clamp_max(0).sum(0)
    tol = 1e-12 * J.abs().sum(0)
    ok = ((d - pos).abs() <= tol) | ((d - neg).abs() <= tol) | (d == 0)
    assert bool(ok.all())


def test_no_conflict_is_the_sum_and_full_leak_is_the_sum() -> None:
    J = torch.tensor([[1.0, -2.0, 0.0], [3.0, -0.5, 0.0]], dtype=torch.float64)  # P in {0, 1}
    assert torch.equal(GradDrop(seed=0)(J), J.sum(0))
    Jc = torch.tensor([[1.0, -2.0], [-3.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(GradDrop(leak=1.0, seed=0)(Jc), Jc.sum(0))
    # leak 1 for task 0 only: task 0 always passes, task 1 masked.
    agg = GradDrop(leak=[1.0, 0.0], seed=0)
    d = agg(Jc)
    U = torch.rand(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(d, graddrop_reference(Jc, U, [1.0, 0.0]))


def test_sign_purity() -> None:
    J = torch.tensor([[1.0, -1.0, 2.0, 0.0, 1.0], [3.0, -1.0, -2.0, 0.0, -3.0]])
    assert torch.allclose(sign_purity(J), torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25]))


def test_mask_frequency_follows_purity() -> None:
    """P(positive sign chosen) = f(P): over many draws the kept share matches."""
    J = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)  # P = 0.5 (1 + 2/4) = 0.75
    agg = GradDrop(seed=0)
    picks = torch.stack([agg(J) for _ in range(2000)]).flatten()
    share = float((picks == 3.0).to(torch.float64).mean())
    assert abs(share - 0.75) < 0.04  # 2000 Bernoulli(0.75) draws: sd ~ 0.01
    assert bool(((picks == 3.0) | (picks == -1.0)).all())


def test_validation() -> None:
    with pytest.raises(ValueError, match="leak values must be in"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="1-D"):
        GradDrop(leak=[[0.1]])
    with pytest.raises(TypeError, match="callable"):
        GradDrop(f=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 leak values but J has 3 rows"):
        GradDrop(leak=[0.1, 0.2])(torch.ones(3, 2))
    assert GradDrop().gramian_only is False


def test_generator_on_other_device_is_used_and_checkpointed() -> None:
    g = torch.Generator().manual_seed(5)
    agg = GradDrop(generator=g)
    J = torch.tensor([[1.0, -1.0, 2.0], [-2.0, 1.0, -1.0]])
    agg(J)
    st_ = agg.state_dict()
    assert st_["rng_device"] == "cpu"
    with pytest.raises(ValueError, match="rng_state"):
        agg.load_state_dict({})


def test_against_torchjd() -> None:
    """TorchJD 0.18's GradDrop is Algorithm 1 on the rows of the matrix with one torch.rand(D)
    draw in the matrix's dtype: identical draws with the same seed."""
    tj = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(0)
    for T in (2, 3, 7):
        for dtype in (torch.float32, torch.float64):
            J = torch.randn(T, 300, generator=gen).to(dtype)
            leak = torch.rand(T, generator=gen).to(dtype)
            torch.manual_seed(9)
            ref = tj.GradDrop(leak=leak)(J)
            ours = GradDrop(leak=leak, seed=9)(J)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert torch.allclose(ours, ref, rtol=tol, atol=tol), (T, dtype)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=6, max_dim=10, min_log_scale=-6, max_log_scale=6),
       seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_expected_structure(J: torch.Tensor, seed: int, K: torch.Tensor) -> None:
    for dtype in (torch.float64, torch.float32):
        assert_expected_structure(GradDrop(seed=seed), J.to(dtype))
    assert_expected_structure(GradDrop(seed=0), K)


def test_finite_on_degenerate_matrices() -> None:
    assert_finite_on_degenerate_matrices(lambda T: GradDrop(seed=0), DEGENERATE_MATRICES)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=5, max_dim=8, min_log_scale=-3, max_log_scale=3),
       log_s=st.floats(-6, 6), seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_positively_homogeneous(J: torch.Tensor, log_s: float, seed: int, K: torch.Tensor) -> None:
    """d(s J) = s d(J) for s > 0 with the same draws (the purity of eq. 1 is scale-free)."""
    assert_positively_homogeneous(lambda: GradDrop(seed=seed), J, 10.0**log_s, rtol=1e-8,
                                  atol=1e-8 * float(J.norm(dim=1).sum()), norm=True)
    assert_positively_homogeneous(lambda: GradDrop(seed=0), K, POSITIVE_SCALES,
                                  atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 2**31 - 1), K=gaussian_matrices())
def test_permutation_invariant(J: torch.Tensor, seed: int, perm_seed: int, K: torch.Tensor) -> None:
    """Reordering the tasks changes no sign purity, and the draws are per coordinate."""
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    assert_permutation_invariant(lambda: GradDrop(seed=seed), J, perm, rtol=1e-9,
                                 atol=1e-9 * float(J.norm(dim=1).sum()), norm=True)
    assert_permutation_invariant(lambda: GradDrop(seed=0), K, 3, atol=1e-9 * scale_of(K))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(GradDrop(seed=0), J)
