"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022): against the
bargaining problem solved directly by cvxpy, TorchJD, and its properties: the fixed point
G alpha = 1 / alpha, Nash's scale invariance, permutation invariance, a finite direction that
improves every task (non-conflicting, strictly) off Pareto stationarity; failure paths and
state."""

from __future__ import annotations

import logging
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators._solvers import min_norm_weights
from torch_mtlgrad.aggregators.nashmtl import NashMTL, NashMTLSolveError

from .._properties import (
    assert_expected_structure,
    assert_non_conflicting,
    assert_nonzero_direction,
    assert_permutation_invariant,
    scale_of,
)
from ..strategies import (
    common_direction_matrices,
    gaussian_matrices,
    improvable_matrices,
    jacobians,
)


def bargaining_direction(J: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """argmax_d sum_i log(u_i . d) s.t. ||d||^2 <= T' over the non-zero rows u_i (normalised;
    the argmax is invariant to positive row scalings), in R^D: the paper's bargaining problem.
    Returns the maximiser, the optimal value and whether the tight solve succeeded."""
    keep = np.linalg.norm(J, axis=1) > 0
    U = J[keep] / np.linalg.norm(J[keep], axis=1, keepdims=True)
    d = cp.Variable(J.shape[1])
    prob = cp.Problem(cp.Maximize(cp.sum(cp.log(U @ d))), [cp.sum_squares(d) <= U.shape[0]])
    try:
        with warnings.catch_warnings():  # "may be inaccurate": then the default tolerances
            warnings.simplefilter("ignore")
            prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        tight = prob.status == "optimal"
    except cp.error.SolverError:
        tight = False
    if not tight:  # the default tolerances
        prob.solve(solver=cp.CLARABEL)
    assert prob.status in ("optimal", "optimal_inaccurate"), prob.status
    return d.value, float(prob.value), tight


@settings(max_examples=30, deadline=None)
@given(improvable_matrices())
def test_matches_bargaining_problem(J: torch.Tensor) -> None:
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    ref, ref_value, tight = bargaining_direction(J.numpy())
    keep = J.norm(dim=1) > 0
    U = J[keep] / J[keep].norm(dim=1, keepdim=True)
    assert abs(float(d @ d) - int(keep.sum())) <= 1e-6 * int(keep.sum())  # on the ball's boundary
    ours_value = float(torch.log(U @ d).sum())
    assert ours_value >= ref_value - 1e-6 * (1 + abs(ref_value))  # optimal up to cvxpy's tolerance
    if tight:
        assert np.abs(d.numpy() - ref).max() <= 1e-5 * np.linalg.norm(ref)
    # Fixed point G alpha = 1/alpha on the non-zero rows (the KKT conditions of the bargaining
    # problem), zero weight on zero rows.
    alpha = agg.weights
    assert alpha is not None
    active = J.norm(dim=1) > 0
    assert bool((alpha[~active] == 0).all())
    gain = (J @ d)[active] * alpha[active]
    assert torch.allclose(gain, torch.ones_like(gain), rtol=0, atol=1e-6)
    assert float(agg.diagnostics["residual"]) <= 1e-6


@settings(max_examples=10, deadline=None)
@given(improvable_matrices(row_scales=False, max_tasks=6, kinds=("spread",)))
def test_matches_torchjd(J: torch.Tensor) -> None:
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("ecos")
    # a non-singular Gramian: T <= D and well-conditioned rows
    assume(J.shape[0] <= J.shape[1])
    assume(float(torch.linalg.svdvals(J)[-1]) > 1e-3 * float(J.norm()))
    # torchjd starts its sequence at alpha = 1 and linearises with 1 / (G 1): where some
    # (G 1)_i <= 0 its first problem fails and it silently keeps alpha = 1 (d = sum of the rows,
    # which can make a task worse); compare only where its start is valid.
    assume(bool(((J @ J.T).sum(1) > 0).all()))
    # Conventions: torchjd's NashMTL takes n_tasks and clips with max_norm (0 disables); its
    # weights solve the same G alpha = 1/alpha (with ECOS and its own stopping rule).  It is
    # compared on full-rank inputs only: on singular Gramians (duplicate rows) its solve fails
    # and it keeps its initial weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torchjd.aggregation.NashMTL(n_tasks=J.shape[0], max_norm=0.0)(J)
    ours = NashMTL(max_norm=0.0)(J)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-4 * float(ours.norm()))


@settings(max_examples=20, deadline=None)
@given(improvable_matrices(max_tasks=6), st.lists(st.floats(-6, 6), min_size=6, max_size=6),
       st.randoms(use_true_random=False))
def test_scale_invariant_and_permutation_equivariant(J: torch.Tensor, logc: list[float],
                                                     rnd) -> None:
    """The bargaining solution ignores the gradients' norms (Nash's scale invariance):
    d(diag(c) J) = d(J), alpha(diag(c) J) = alpha(J) / c; reordering tasks reorders alpha."""
    T = J.shape[0]
    c = 10.0 ** torch.tensor(logc[:T], dtype=J.dtype)
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    alpha = agg.weights
    agg2 = NashMTL(max_norm=0.0)
    d2 = agg2(J * c[:, None])
    assert torch.allclose(d2, d, rtol=0, atol=1e-7 * float(d.norm()))
    assert torch.allclose(agg2.weights * c, alpha, rtol=1e-6, atol=0)
    perm = list(range(T))
    rnd.shuffle(perm)
    agg3 = NashMTL(max_norm=0.0)
    d3 = agg3(J[perm])
    assert torch.allclose(d3, d, rtol=0, atol=1e-7 * float(d.norm()))
    assert torch.allclose(agg3.weights, alpha[perm], rtol=1e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(jacobians(max_tasks=6, max_dim=8, min_log_scale=-6, max_log_scale=6))
def test_hard_inputs_finite_or_clear_error(J: torch.Tensor) -> None:
    """Random, rank-deficient, duplicate, opposite and zero rows: a finite direction that
    improves every non-zero task, or (only at a Pareto-stationary point) the documented error."""
    agg = NashMTL()
    try:
        d = agg(J)
    except NashMTLSolveError as err:
        assert "no direction improves every task" in str(err) or "status" in str(err)
        return
    assert bool(torch.isfinite(d).all())
    assert float(d.norm()) <= 1.0 + 1e-9
    active = J.norm(dim=1) > 0
    if bool(active.any()):
        assert bool(((J @ d)[active] > 0).all())


def test_two_tasks_closed_form_and_clipping() -> None:
    J = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    agg = NashMTL(max_norm=0.0)
    assert torch.allclose(agg(J), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(agg.weights, torch.tensor([1.0, 0.25], dtype=torch.float64), atol=1e-7)
    clipped = NashMTL()  # default max_norm = 1: ||d|| = sqrt(2) is clipped to 1
    d = clipped(J)
    assert abs(float(d.norm()) - 1.0) < 1e-12
    assert torch.allclose(d, torch.tensor([1.0, 1.0], dtype=torch.float64) / 2**0.5, atol=1e-7)
    assert torch.allclose(clipped.weights @ J, d)
    one = NashMTL(max_norm=0.0)
    assert torch.allclose(one(torch.tensor([[3.0, 4.0]])), torch.tensor([0.6, 0.8]))


def test_start_with_non_improving_equal_weights() -> None:
    """(G 1)_1 < 0: equal weights would make task 1 worse; the sequence still finds the NBS."""
    J = torch.tensor([[0.2288, 0.5323, 0.9233], [1.4529, 0.0866, -1.7989]], dtype=torch.float64)
    assert float((J @ J.T).sum(1)[0]) < 0
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    assert bool((J @ d > 0).all())
    assert torch.allclose((J @ d) * agg.weights, torch.ones(2, dtype=torch.float64), atol=1e-9)


def test_zero_rows_and_float32() -> None:
    J = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    assert d.dtype == torch.float32
    assert agg.weights[1] == 0
    assert torch.allclose(d, torch.tensor([1.0, 1.0, 0.0]), atol=1e-5)
    assert torch.equal(NashMTL()(torch.zeros(3, 4)), torch.zeros(4))


def test_stationary_point_raises_then_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(NashMTLSolveError, match="no previous weights"):
        NashMTL()(opposite)
    with pytest.raises(NashMTLSolveError, match="Pareto-stationary"):
        NashMTL(on_failure="raise")(opposite)
    agg = NashMTL()
    good = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    agg(good)
    prev = agg.alpha.clone()  # the unclipped weights (1, 1/2)
    with caplog.at_level(logging.WARNING, logger="torch_mtlgrad.aggregators.nashmtl"):
        d = agg(opposite)
    assert "reusing the previous weights" in caplog.text
    assert float(agg.diagnostics["solve_failed"]) == 1.0
    assert torch.equal(agg.alpha, prev)
    # previous weights, not equal weights: ||prev @ opposite|| = 1/2 < max_norm, so no clipping
    assert torch.equal(agg.weights, prev)
    assert torch.allclose(d, prev @ opposite)


def test_solver_failure_is_reported(monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    J = torch.tensor([[1.0, 0.2], [0.1, 2.0]], dtype=torch.float64)
    agg = NashMTL()
    agg(J)
    prev = agg.alpha.clone()

    def fail(self, *args, **kwargs):
        raise cp.error.SolverError("simulated failure")

    monkeypatch.setattr(cp.Problem, "solve", fail)
    with pytest.raises(NashMTLSolveError, match="simulated failure"):
        NashMTL(on_failure="raise")(J)
    with pytest.raises(NashMTLSolveError, match="no previous weights"):
        NashMTL()(J)
    with caplog.at_level(logging.WARNING, logger="torch_mtlgrad.aggregators.nashmtl"):
        agg(J * 1.5)
    assert "simulated failure" in caplog.text and "previous weights" in caplog.text
    assert torch.equal(agg.alpha, prev)
    w = agg.weights
    assert torch.allclose(w / w.norm(), prev / prev.norm())  # the previous ones, clipped
    assert float(agg.diagnostics["solve_failed"]) == 1.0


def test_failure_inside_the_sequence_keeps_the_last_iterate(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    J = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.5], [0.1, 0.1, 1.0]], dtype=torch.float64)
    ref = NashMTL(max_norm=0.0)(J)
    calls = {"n": 0}
    real_solve = cp.Problem.solve

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise cp.error.SolverError("second solve fails")
        return real_solve(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", flaky)
    agg = NashMTL(max_norm=0.0, tol=1e-300)  # never converged by the tolerance: keeps iterating
    with caplog.at_level(logging.WARNING, logger="torch_mtlgrad.aggregators.nashmtl"):
        d = agg(J)
    assert "keeping the previous iterate" in caplog.text
    assert float(agg.diagnostics["solve_failed"]) == 0.0
    assert torch.allclose(d, ref, atol=1e-6)


def test_update_weights_every_reuses_weights() -> None:
    rng = np.random.default_rng(0)
    agg = NashMTL(max_norm=0.0, update_weights_every=3)
    Js = [torch.tensor(rng.standard_normal((3, 5)) + 1.5) for _ in range(4)]
    agg(Js[0])
    first = agg.weights.clone()
    for J in Js[1:3]:
        d = agg(J)
        assert float(agg.diagnostics["solved"]) == 0.0
        assert torch.equal(agg.weights, first)
        assert torch.allclose(d, first @ J)
    agg(Js[3])
    assert float(agg.diagnostics["solved"]) == 1.0
    assert not torch.allclose(agg.weights, first)


def test_state_dict_roundtrip_gives_identical_next_output() -> None:
    rng = np.random.default_rng(1)
    Js = [torch.tensor(rng.standard_normal((4, 6)) + 1.0) for _ in range(5)]
    for every in (1, 2):
        a = NashMTL(update_weights_every=every)
        for J in Js[:3]:
            a(J)
        state = a.state_dict()
        b = NashMTL(update_weights_every=every)
        b.load_state_dict(state)
        for J in Js[3:]:
            assert torch.equal(a(J), b(J))
    with pytest.raises(ValueError, match="unknown keys"):
        NashMTL().load_state_dict({"bogus": 1})


def test_warm_start_and_validation() -> None:
    J = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0.3, 0.0, 1.0]], dtype=torch.float64)
    agg = NashMTL()
    d1 = agg(J)
    d2 = agg(J)  # starts at the previous solution: already converged
    assert float(agg.diagnostics["iterations"]) == 1.0
    assert torch.allclose(d1, d2, atol=1e-9)
    with pytest.raises(ValueError, match="tracking 3 tasks"):
        agg(J[:2])
    agg.reset()
    agg(J[:2])
    with pytest.raises(ValueError, match="not installed"):
        NashMTL(solver="NOSUCHSOLVER")
    with pytest.raises(ValueError, match="optim_niter"):
        NashMTL(optim_niter=0)
    assert isinstance(get("nashmtl", max_norm=2.0), NashMTL)


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices(tall=True))
def test_expected_structure(J: torch.Tensor) -> None:
    """Linearly independent rows (T <= D): never Pareto-stationary."""
    assert_expected_structure(NashMTL, J)


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices(tall=True))
def test_non_conflicting(J: torch.Tensor) -> None:
    assert_non_conflicting(NashMTL, J)


@settings(max_examples=25, deadline=None)
@given(gaussian_matrices(tall=True))
def test_permutation_invariant(J: torch.Tensor) -> None:
    assert_permutation_invariant(NashMTL, J, 3, atol=1e-9 * scale_of(J))


@settings(max_examples=25, deadline=None)
@given(common_direction_matrices())
def test_nonzero_off_weak_stationarity(J: torch.Tensor) -> None:
    """The rows share a descent direction (0 is not in their hull): d != 0."""
    assert_nonzero_direction(NashMTL, J)


# --- Ordinary inputs: a verified answer or an error, never equal weights ----------------------

ORDINARY_SHAPES = ((3, 1), (4, 3), (9, 11))


def _ordinary(shape: tuple[int, int], seed: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    T, D = shape
    J = rng.standard_normal(shape)
    if kind == "rank_deficient":
        r = max(1, min(T, D) // 2)
        J = rng.standard_normal((T, r)) @ rng.standard_normal((r, D))
    return torch.tensor(J, dtype=dtype)


def _stationary_to_precision(J: torch.Tensor) -> bool:
    U = J.double() / J.double().norm(dim=1, keepdim=True)
    C = U @ U.T
    w = min_norm_weights(C)
    return float(w @ C @ w) <= 1e-6


def _assert_verified(J: torch.Tensor, agg: NashMTL) -> None:
    """alpha_i (G alpha)_i = 1 (the bargaining KKT conditions) and J d > 0: not equal weights.
    The solve is exact for the Gramian it was given (``residual``); float32 weights and a float32
    Gramian move the products by about 1e-7 times G's conditioning, hence a looser check."""
    alpha = agg.weights.double()
    G = J.double() @ J.double().T
    assert bool((alpha > 0).all())
    atol = 1e-6 if J.dtype == torch.float64 else 1e-3
    assert torch.allclose(alpha * (G @ alpha), torch.ones_like(alpha), rtol=0, atol=atol)
    assert bool((J.double() @ (alpha @ J.double()) > 0).all())
    assert float(agg.diagnostics["residual"]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient"])
@pytest.mark.parametrize("shape", ORDINARY_SHAPES)
def test_ordinary_inputs_verified_or_stationary(shape, kind, dtype) -> None:
    """Seeded random matrices of the shapes that used to fail (3 x 1, 4 x 3, 9 x 11, full rank
    and rank-deficient, float64 and float32): every input gets weights verified by the
    bargaining conditions, or the stationarity error exactly where the input is Pareto-
    stationary to within float precision (a 3 x 1 matrix with entries of both signs, ...)."""
    answered = 0
    for seed in range(12):
        J = _ordinary(shape, seed, kind, dtype)
        agg = NashMTL(max_norm=0.0)
        try:
            agg(J)
        except NashMTLSolveError as err:
            assert "no direction improves every task" in str(err)
            assert _stationary_to_precision(J)
            continue
        answered += 1
        assert not _stationary_to_precision(J)
        _assert_verified(J, agg)
        for solver, status, kkt in agg.last_solve_log:
            assert status in ("optimal", "optimal_inaccurate", "verified") or kkt == float("inf")
    if shape == (9, 11) and kind == "gaussian":
        assert answered == 12  # independent rows: never stationary


def test_clarabel_error_answered_by_a_fallback_solver() -> None:
    """A 9 x 11 Gaussian matrix (independent rows) on which Clarabel stops with
    'InsufficientProgress' (a SolverError): ECOS answers, and its answer is verified."""
    J = torch.tensor(np.random.default_rng(165).standard_normal((9, 11)))
    agg = NashMTL(max_norm=0.0)
    agg(J)
    _assert_verified(J, agg)
    first = agg.last_solve_log[0]
    assert first[0] == "CLARABEL"
    if first[2] <= agg.kkt_tol:
        pytest.skip("this Clarabel build solves the problem: no fallback needed")
    assert first[1].startswith("error")
    assert agg.last_solve_log[1][0] == "ECOS" and agg.last_solve_log[1][2] <= agg.kkt_tol
    assert float(agg.diagnostics["fallbacks"]) >= 1
    with pytest.raises(NashMTLSolveError, match="CLARABEL"):
        NashMTL(max_norm=0.0, fallback_solvers=())(J)  # the old behaviour: no other solver


def test_float32_stationary_is_reported_not_solved() -> None:
    """float32, 3 x 1, entries of both signs (0 is in the hull of the rows): the float32 Gramian
    is only stationary to rounding, and used to reach the solver ('optimal_inaccurate' or a
    meaningless 'optimal'); it is now the stationarity error.  TorchJD returns weights here
    (where its ECOS solve fails: all ones), which improve no direction for every task."""
    torch.manual_seed(17)
    J = torch.randn(3, 1)
    assert float(J.min()) < 0 < float(J.max())
    with pytest.raises(NashMTLSolveError, match="no direction improves every task"):
        NashMTL()(J)


def _force_status(monkeypatch: pytest.MonkeyPatch, status: str, perturb: float = 0.0,
                  solvers: tuple[str, ...] = ("CLARABEL",)) -> None:
    real_solve = cp.Problem.solve

    def solve(self, *args, **kwargs):
        out = real_solve(self, *args, **kwargs)
        if kwargs.get("solver") in solvers:
            var = self.variables()[0]
            if perturb and var.value is not None:
                var.value = var.value * (1 + perturb * np.arange(1, var.size + 1))
            self._status = status
        return out

    monkeypatch.setattr(cp.Problem, "solve", solve)


def test_optimal_inaccurate_accepted_when_kkt_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    J = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.5], [0.1, 0.1, 1.0]], dtype=torch.float64)
    ref = NashMTL(max_norm=0.0)(J)
    _force_status(monkeypatch, "optimal_inaccurate")
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    assert agg.last_solve_log[0][:2] == ("CLARABEL", "optimal_inaccurate")
    assert agg.last_solve_log[0][2] <= agg.kkt_tol
    assert float(agg.diagnostics["fallbacks"]) == 0.0
    assert torch.allclose(d, ref, atol=1e-9)


def test_inaccurate_answer_failing_kkt_goes_to_the_next_solver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    J = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.5], [0.1, 0.1, 1.0]], dtype=torch.float64)
    ref = NashMTL(max_norm=0.0)(J)
    _force_status(monkeypatch, "optimal_inaccurate", perturb=1e-2)
    agg = NashMTL(max_norm=0.0, fallback_solvers=["ECOS"])
    d = agg(J)
    first = agg.last_solve_log[0]
    assert first[:2] == ("CLARABEL", "optimal_inaccurate") and first[2] > agg.kkt_tol
    assert agg.last_solve_log[1][0] == "ECOS" and agg.last_solve_log[1][2] <= agg.kkt_tol
    assert float(agg.diagnostics["fallbacks"]) >= 1.0
    assert torch.allclose(d, ref, atol=1e-7)
    _assert_verified(J, agg)


def test_polished_restart_or_error_never_equal_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every solver's answer is off (KKT fails): a perturbation of 1e-2 is polished to the
    verified Nash solution; a wild one (factor up to 10) is an error, never equal weights."""
    J = torch.tensor([[1.0, 0.3, 0.0], [-0.2, 1.0, 0.5], [0.1, 0.1, 1.0]], dtype=torch.float64)
    ref = NashMTL(max_norm=0.0)(J)
    _force_status(monkeypatch, "optimal_inaccurate", perturb=1e-2,
                  solvers=("CLARABEL", "ECOS", "SCS"))
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    assert agg.last_solve_log[-1][:2] == ("polished restart", "verified")
    assert torch.allclose(d, ref, atol=1e-9)
    _assert_verified(J, agg)

    _force_status(monkeypatch, "optimal_inaccurate", perturb=3.0,
                  solvers=("CLARABEL", "ECOS", "SCS"))
    bad = NashMTL(max_norm=0.0, optim_niter=1)
    try:
        d = bad(J)
    except NashMTLSolveError as err:
        assert "KKT" in str(err) or "unverified" in str(err)
        return
    _assert_verified(J, bad)  # the polish found the solution anyway


def test_matches_torchjd_on_ordinary_shapes() -> None:
    """Against TorchJD's NashMTL on the seeded shapes (where TorchJD's ECOS solve succeeded,
    i.e. its weights are not its initial all-ones): the same convention G alpha = 1/alpha, to
    TorchJD's stopping accuracy (||G alpha - 1/alpha|| < 1e-3).  Where this class raises (a
    Pareto-stationary input), TorchJD's direction does not improve every task."""
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("ecos")
    compared = 0
    for shape in ORDINARY_SHAPES:
        for seed in range(8):
            for kind in ("gaussian", "rank_deficient"):
                J = _ordinary(shape, seed, kind, torch.float64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = torchjd.aggregation.NashMTL(n_tasks=shape[0], max_norm=0.0)
                    w_ref = ref.weighting(J)
                agg = NashMTL(max_norm=0.0)
                try:
                    agg(J)
                except NashMTLSolveError:
                    d_ref = w_ref @ J
                    cos = (J @ d_ref) / (J.norm(dim=1) * d_ref.norm().clamp_min(1e-300))
                    assert float(cos.min()) <= 1e-6
                    continue
                if torch.allclose(w_ref, torch.ones_like(w_ref)):
                    continue  # TorchJD's silent fallback to its initial weights
                w = agg.weights
                assert float((w - w_ref).abs().max()) <= 2e-3 * float(w.abs().max())
                compared += 1
    assert compared >= 20
