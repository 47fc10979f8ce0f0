"""SDMGrad (Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023) recomputed by hand in float64 numpy over several calls (the
warm-started inner weights), against TorchJD 0.18's ``SDMGradWeighting`` (the same steps; its
``1e-8`` in the normalisation as a step-size map), and, with a stable step, against cvxpy's
solution of the paper's inner problem (``lambda = 0``: MGDA's min-norm weights); then its
properties: convex weights, the mean as ``lambda -> inf``, scale invariance, permutation
invariance over steps, the paper's double-sampled ``J_1 J_2^T``, state and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.sdmgrad import SDMGrad

from .._properties import (
    assert_close,
    assert_expected_structure,
    assert_permutation_invariant,
    assert_positively_homogeneous,
    assert_state_dict_roundtrip,
    scale_of,
)
from ..strategies import gaussian_matrices, jacobians
from .test_moco import simplex_projection_bisection


def sdmgrad_reference(Gs: list[np.ndarray], lmbd: float, niter: int, lr: float,
                      momentum: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The task weights and inner weights of each call, written from the update equations."""
    T = Gs[0].shape[0]
    w = np.full(T, 1.0 / T)
    wt = np.full(T, 1.0 / T)
    weights, inner = [], []
    for G in Gs:
        s = np.mean(np.sqrt(np.maximum(np.diag(G), 0)))
        A = G / s**2 if s > 0 else np.zeros_like(G)
        v = None
        for _ in range(niter):
            g = A @ (w + lmbd * wt)
            v = g if v is None else momentum * v + g
            w = simplex_projection_bisection(w - lr * v)
        weights.append((w + lmbd * wt) / (1 + lmbd))
        inner.append(w.copy())
    return weights, inner


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 6), D=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       lmbd=st.floats(0.0, 2.0), niter=st.integers(1, 30), lr=st.floats(0.05, 0.6),
       momentum=st.floats(0.0, 0.9))
def test_matches_hand_computed_algorithm(T: int, D: int, seed: int, lmbd: float, niter: int,
                                         lr: float, momentum: float) -> None:
    rng = np.random.default_rng(seed)
    Js = [rng.standard_normal((T, D)) * 10 ** rng.uniform(-2, 2) for _ in range(4)]
    Js[1][0] = 0.0  # a zero row on the way
    ref, inner = sdmgrad_reference([J @ J.T for J in Js], lmbd, niter, lr, momentum)
    agg = SDMGrad(lmbd=lmbd, niter=niter, lr=lr, momentum=momentum)
    for k, J in enumerate(Js):
        d = agg(torch.tensor(J))
        assert np.abs(agg.weights.numpy() - ref[k]).max() <= 1e-10, (k, agg.weights, ref[k])
        assert np.abs(agg.diagnostics["w"].numpy() - inner[k]).max() <= 1e-10
        assert np.abs(d.numpy() - ref[k] @ J).max() <= 1e-10 * (1 + np.abs(J).sum())


def test_matches_hand_computed_algorithm_at_the_authors_step() -> None:
    """The same at lr = 10, beyond the stable step, where rounding differences can grow from step
    to step (4.3e-13 on these inputs, above 1e-7 on some random ones; a wrong update would be off
    by O(1)): fixed inputs."""
    rng = np.random.default_rng(5)
    worst = 0.0
    for T in (2, 3, 4, 6):
        Js = [rng.standard_normal((T, 7)) for _ in range(5)]
        ref, _ = sdmgrad_reference([J @ J.T for J in Js], 0.3, 20, 10.0, 0.5)
        agg = SDMGrad()
        for k, J in enumerate(Js):
            agg(torch.tensor(J))
            worst = max(worst, float(np.abs(agg.weights.numpy() - ref[k]).max()))
    assert worst <= 1e-7, worst


def test_against_torchjd() -> None:
    """TorchJD 0.18's SDMGradWeighting (stateful, not random; the same defaults lr=10,
    momentum=0.5, n_iter=20, lambda_=0.3): the same weights over several calls.  It divides G
    by s^2 + 1e-8 where we divide by s^2: ours at lr equals theirs at lr (s^2 + 1e-8) / s^2,
    asserted call by call; at gradients of norm ~1e3 the 1e-8 is below rounding."""
    tj = pytest.importorskip("torchjd.aggregation")
    assert not getattr(tj.SDMGradWeighting, "random", False)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for T in (2, 3, 6):
        for scale in (1e3, 1e-3):
            ours, theirs = SDMGrad(), tj.SDMGradWeighting()
            for _ in range(4):
                J = scale * torch.randn(T, 12, generator=gen, dtype=torch.float64)
                G = J @ J.T
                s2 = float(torch.diagonal(G).sqrt().mean() ** 2)
                ours.lr = 10.0 * s2 / (s2 + 1e-8)  # their step on G / (s^2 + 1e-8)
                ours(J)
                w = theirs(G)
                diff = float((ours.weights - w).abs().max())
                worst = max(worst, diff)
                assert diff <= 1e-10, (T, scale, diff)  # rounding, amplified by lr = 10
    # The plain defaults agree where the 1e-8 is negligible.
    J = 1e3 * torch.randn(4, 12, generator=gen, dtype=torch.float64)
    assert_close(SDMGrad()(J), tj.SDMGradWeighting()(J @ J.T) @ J, atol=1e-8 * scale_of(J))
    print(f"SDMGrad vs TorchJD: largest weight difference {worst:.3g}")


def inner_problem_cvxpy(G: np.ndarray, lmbd: float) -> np.ndarray:
    """argmin over the simplex of 1/2 ||J^T w + lmbd g_0||^2 = 1/2 (w + lmbd/T)^T G (w + lmbd/T),
    on G / s^2 (the same minimiser)."""
    cp = pytest.importorskip("cvxpy")
    T = G.shape[0]
    s2 = np.mean(np.sqrt(np.diag(G))) ** 2
    evals, V = np.linalg.eigh(G / s2)
    L = V * np.sqrt(np.clip(evals, 0, None))
    w = cp.Variable(T)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ (w + lmbd / T))),
               [w >= 0, cp.sum(w) == 1]).solve(solver="CLARABEL")
    return np.asarray(w.value)


@settings(max_examples=20, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=5, max_dim=8, tall=True),
       lmbd=st.sampled_from([0.0, 0.3, 1.0]))
def test_a_stable_step_solves_the_papers_inner_problem(J: torch.Tensor, lmbd: float) -> None:
    """With lr below 2 (1 + momentum) / lambda_max(A), the iterates reach the minimiser of the
    inner problem (lambda = 0: MGDA's min-norm weights), checked against cvxpy."""
    G = J @ J.T
    s2 = float(torch.diagonal(G).sqrt().mean() ** 2)
    evals = torch.linalg.eigvalsh(G / s2)
    cond = float(evals.max() / evals.min())
    assume(cond <= 30)  # linear convergence at rate 1 - 1/cond
    agg = SDMGrad(lmbd=lmbd, lr=1.0 / float(evals.max()), niter=1000)
    agg(J)
    ref = inner_problem_cvxpy(G.numpy(), lmbd)
    w = agg.diagnostics["w"].numpy()
    # Clarabel's answer is accurate to a few 1e-6 (largest difference seen over 100 examples:
    # 3.8e-6, where ours had the lower objective): ours is checked at the optimum itself too.
    assert np.abs(w - ref).max() <= 2e-5, (w, ref, cond)
    A = (G / s2).numpy()
    T = G.shape[0]

    def objective(x: np.ndarray) -> float:
        return 0.5 * (x + lmbd / T) @ A @ (x + lmbd / T)

    assert objective(w) <= objective(ref) + 1e-12
    # The projected-gradient fixed point: w = Pi(w - t grad) for a step t (optimality on the
    # simplex), with the test's own projection.
    moved = simplex_projection_bisection(w - 0.1 * A @ (w + lmbd / T))
    assert np.abs(moved - w).max() <= 1e-12


def test_lambda_limits_and_the_authors_step() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # lambda -> inf: the mean.
    assert_close(SDMGrad(lmbd=1e9).aggregate(J).weights, torch.full((2,), 0.5,
                                                                    dtype=torch.float64),
                 atol=1e-8)
    # The minimiser of the inner problem for lambda = 0.3 here is w = (0.89, 0.11); the authors'
    # lr = 10 settles elsewhere (module docstring), the value TorchJD reproduces.
    stable = SDMGrad(lr=0.5, niter=200)
    stable(J)
    assert_close(stable.diagnostics["w"], torch.tensor([0.89, 0.11], dtype=torch.float64),
                 atol=1e-9)
    default = SDMGrad()
    for _ in range(5):
        default(J)
    assert_close(default.diagnostics["w"], torch.tensor([0.0342, 0.9658], dtype=torch.float64),
                 atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(min_tasks=1, max_tasks=8, max_dim=10, min_log_scale=-6, max_log_scale=6),
       lmbd=st.floats(0.0, 2.0), K=gaussian_matrices())
def test_convex_weights_on_hard_inputs(J: torch.Tensor, lmbd: float, K: torch.Tensor) -> None:
    """Weights (w + lmbd / T) / (1 + lmbd) with w on the simplex, over several calls."""
    T = J.shape[0]
    agg = SDMGrad(lmbd=lmbd)
    for dtype in (torch.float64, torch.float32, torch.float64):
        out = assert_expected_structure(agg, J.to(dtype))
        w = out.weights.double()
        assert abs(float(w.sum()) - 1) <= 1e-5
        assert bool((w >= lmbd / T / (1 + lmbd) - 1e-6).all()), w
    assert_expected_structure(SDMGrad(), K)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=2, max_tasks=6, max_dim=8, min_log_scale=-3,
                           max_log_scale=3), perm_seed=st.integers(0, 2**31 - 1),
       lr=st.sampled_from([0.5, 10.0]))
def test_permutation_invariant_over_steps(J: torch.Tensor, perm_seed: int, lr: float) -> None:
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(perm_seed))
    steps = [J * (1 + 0.2 * k) + 0.1 * k * J.roll(1, 0) for k in range(4)]
    assert_permutation_invariant(lambda: SDMGrad(lr=lr), steps, perm, atol=1e-9 * scale_of(J),
                                 weights=lambda a: a.weights, weights_atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(J=gaussian_matrices(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-3,
                           max_log_scale=3), log_c=st.floats(-6, 6),
       lr=st.sampled_from([0.5, 10.0]))
def test_scale_invariant_weights(J: torch.Tensor, log_c: float, lr: float) -> None:
    """The normalisation by s^2 makes the weights independent of the gradients' scale:
    d(c J) = c d(J)."""
    assert_positively_homogeneous(lambda: SDMGrad(lr=lr), J, 10.0**log_c, rtol=1e-9,
                                  atol=1e-9 * scale_of(J), norm=True)


def test_double_sampling_and_the_authors_scale() -> None:
    """The paper's estimate A = J_xi J_xi'^T (not symmetric) goes through aggregate_gramian;
    the authors' code multiplies the direction by T: "sdmgrad*T"."""
    rng = np.random.default_rng(0)
    J1 = rng.standard_normal((3, 7))
    J2 = J1 + 0.5 * rng.standard_normal((3, 7))  # another batch's gradients
    A = J1 @ J2.T
    ref, _ = sdmgrad_reference([A], 0.3, 20, 10.0, 0.5)
    out = SDMGrad().aggregate_gramian(torch.tensor(A))
    assert np.abs(out.weights.numpy() - ref[0]).max() <= 1e-12
    assert not np.allclose(A, A.T)
    J = torch.tensor(J1)
    assert_close(get("sdmgrad*T")(J), 3 * get("sdmgrad")(J), rtol=1e-15, atol=0)


def test_state_warm_start_and_reset() -> None:
    assert_state_dict_roundtrip(SDMGrad, seed=3, steps=8, split=3, shape=(4, 6))
    J = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]], dtype=torch.float64)
    agg = SDMGrad(lr=0.5)
    agg(J)
    first = agg.diagnostics["w"].clone()
    assert torch.equal(agg.state_dict()["w"], first)
    agg(J)  # starts from the first call's w: the same steps continue
    two = SDMGrad(lr=0.5, niter=40)
    two(J)
    assert_close(agg.diagnostics["w"], two.diagnostics["w"], atol=1e-3)
    agg.reset()
    assert agg.w is None and torch.equal(agg(J), SDMGrad(lr=0.5)(J))
    b = SDMGrad()
    b.load_state_dict({"w": torch.full((3,), 1 / 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="solving for 3 tasks, got 2"):
        b(J[:2])
    with pytest.raises(ValueError, match="unknown keys"):
        SDMGrad().load_state_dict({"lam": torch.ones(2)})
    with pytest.raises(ValueError, match="1-D float tensor"):
        SDMGrad().load_state_dict({"w": torch.ones(2, 2)})


def test_arguments_and_registry() -> None:
    for kw, msg in (({"lmbd": -0.1}, "lmbd must be"), ({"lmbd": float("inf")}, "lmbd must be"),
                    ({"niter": 0}, "niter must be"), ({"niter": 2.0}, "niter must be"),
                    ({"lr": 0.0}, "lr must be"), ({"momentum": 1.0}, "momentum must be"),
                    ({"momentum": True}, "momentum must be")):
        with pytest.raises(ValueError, match=msg):
            SDMGrad(**kw)
    for name in ("sdmgrad", "sdm-grad", "SDM_Grad"):
        assert isinstance(get(name), SDMGrad)
    agg = get("sdmgrad")
    assert (agg.lmbd, agg.niter, agg.lr, agg.momentum) == (0.3, 20, 10.0, 0.5)
    assert agg.reads == "gramian" and agg.stateful and not agg.random
