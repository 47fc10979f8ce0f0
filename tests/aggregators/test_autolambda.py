"""Auto-Lambda (Liu, James, Davison and Johns, *Auto-Lambda: Disentangling Dynamic Task
Relationships*, TMLR 2022) at the method level: its update equations by hand in float64 (the
meta-gradient ``-J u``, Adam or SGD on ``lambda``, the direction with the updated weights), the
paper's first-order reading (a task whose gradient agrees with the validation gradient gains
weight), permutation invariance, absent tasks, state and resume, the registry entry and its
scale convention, and every error it raises.  TorchJD 0.18 has no Auto-Lambda to compare with;
the bilevel reference (an unrolled float64 virtual step through autograd, and the authors' finite
difference) is in ``tests/test_validation_losses.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad import NonFiniteError
from torch_mtlgrad.aggregators import _registry as reg
from torch_mtlgrad.aggregators import get, scale_convention
from torch_mtlgrad.aggregators.autolambda import AutoLambda

from .._properties import assert_close, assert_permutation_invariant
from ..strategies import jacobians
from ..weightings._reference import make


class Fed(AutoLambda):
    """AutoLambda fed a fixed validation input ``u`` at every call (for the shared property
    asserts, which call ``agg(J, losses)``)."""

    def __init__(self, u: torch.Tensor, **kw) -> None:
        super().__init__(**kw)
        self.u = u

    def aggregate(self, J, losses=None, **kw):
        self.set_validation(self.u)
        return super().aggregate(J, losses, **kw)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["adam", "sgd"]),
       st.floats(1e-4, 0.5), st.floats(-2, 2), st.floats(1e-3, 1.0))
def test_matches_hand_computed_updates(T: int, seed: int, opt: str, lr: float, init: float,
                                       eta: float) -> None:
    rng = np.random.default_rng(seed)
    agg = AutoLambda(init=init, lr=lr, optimizer=opt)
    ref = make(opt, np.full(T, init), lr)
    for _ in range(5):
        J = rng.standard_normal((T, 6))
        g_val = rng.standard_normal(6)
        before = ref.x.copy()
        ref.step(-eta * J @ g_val)  # dL_val(theta') / dlambda = -eta g_val . g_t
        out = agg.aggregate_validation(torch.tensor(J), torch.tensor(g_val), lr=eta)
        assert np.allclose(agg.diagnostics["lambda_before"].numpy(), before, rtol=1e-12, atol=0)
        assert np.allclose(out.weights.numpy(), ref.x, rtol=1e-12, atol=1e-12)
        assert np.allclose(out.direction.numpy(), ref.x @ J, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(jacobians(min_tasks=1, max_tasks=6, max_dim=8, min_log_scale=-3, max_log_scale=3),
       st.integers(0, 2**31 - 1))
def test_weight_grows_where_the_task_agrees_with_the_validation_gradient(J, seed) -> None:
    """The paper's reading of (2): one SGD meta step moves ``lambda_t`` by ``beta eta g_val .
    g_t``: up for a task whose gradient agrees with the validation gradient, down otherwise."""
    u = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(seed), dtype=J.dtype)
    agg = AutoLambda(init=1.0, lr=0.3, optimizer="sgd")
    w = agg.aggregate_validation(J, u, lr=0.5).weights
    assert_close(w - 1.0, 0.3 * 0.5 * (J @ u), rtol=1e-12, atol=1e-15 * float((J @ u).abs().max()))


@settings(max_examples=20, deadline=None)
@given(jacobians(min_tasks=2, max_tasks=6, max_dim=8), st.randoms(use_true_random=False))
def test_permutation_invariant(J: torch.Tensor, rnd) -> None:
    u = torch.linspace(-1.0, 1.0, J.shape[1], dtype=J.dtype)
    perm = list(range(J.shape[0]))
    rnd.shuffle(perm)
    scale = float(J.abs().max())
    assert_permutation_invariant(lambda: Fed(u, lr=0.05), [J, J * 0.5, J * 2.0], perm,
                                 rtol=1e-12, atol=1e-12 * scale * 10,
                                 weights=lambda agg: agg.weights, weights_rtol=1e-9,
                                 weights_atol=1e-12)


def test_absent_tasks_keep_their_lambda_and_the_rest_match_the_method_on_present_rows() -> None:
    torch.manual_seed(0)
    u = torch.randn(5, dtype=torch.float64)
    agg = AutoLambda(lr=0.01)
    for _ in range(2):
        agg.aggregate_validation(torch.randn(3, 5, dtype=torch.float64), u)
    state = copy.deepcopy(agg.state_dict())
    J = torch.randn(2, 5, dtype=torch.float64)
    out = agg.aggregate_validation(J, u, present=[True, False, True])
    assert out.weights[1] == 0.0
    assert torch.equal(agg.lam[1], state["lambda"]["value"][1])
    # The present tasks step as a method holding their slice of the state alone would.
    sub = AutoLambda(lr=0.01)
    sub.load_state_dict(copy.deepcopy(state))
    sub._lam = sub._lam.restrict(torch.tensor([0, 2]))
    ref = sub.aggregate_validation(J, u)
    assert torch.equal(out.direction, ref.direction)
    assert torch.equal(out.weights[[0, 2]], ref.weights)
    # present all True is the plain call.
    a, b = copy.deepcopy(agg), copy.deepcopy(agg)
    J3 = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(a.aggregate_validation(J3, u, present=[True] * 3).direction,
                       b.aggregate_validation(J3, u).direction)


def test_task_first_present_later_starts_at_init() -> None:
    u = torch.ones(4, dtype=torch.float64)
    agg = AutoLambda(init=0.1, lr=0.01)
    agg.aggregate_validation(torch.ones(2, 4, dtype=torch.float64), u, present=[True, False, True])
    assert agg.lam[1].item() == 0.1


def test_state_dict_resume_is_bit_exact_and_reset_starts_over() -> None:
    torch.manual_seed(1)
    data = [(torch.randn(3, 7), torch.randn(7)) for _ in range(6)]
    a = AutoLambda(lr=0.02)
    for J, g in data[:3]:
        a.aggregate_validation(J, g, lr=0.1)
    b = AutoLambda(lr=0.02)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for J, g in data[3:]:
        assert torch.equal(a.aggregate_validation(J, g, lr=0.1).direction,
                           b.aggregate_validation(J, g, lr=0.1).direction)
    a.reset()
    c = AutoLambda(lr=0.02)
    J, g = data[0]
    assert torch.equal(a.aggregate_validation(J, g).direction, c.aggregate_validation(J, g).direction)
    with pytest.raises(ValueError, match="unknown keys"):
        c.load_state_dict({"lam": 1})


def test_without_validation_is_a_clear_error_and_changes_nothing() -> None:
    agg = get("autolambda")
    J = torch.randn(3, 4)
    with pytest.raises(ValueError, match="validation_losses=fn to MultiTaskOptimizer"):
        agg.aggregate(J)
    assert agg.lam is None and agg.state_dict()["lambda"]["value"] is None
    agg.aggregate_validation(J, torch.ones(4))
    state = copy.deepcopy(agg.state_dict())
    with pytest.raises(ValueError, match="needs the gradient of the validation loss"):
        agg(J)  # the staged input is consumed by each call
    assert torch.equal(agg.state_dict()["lambda"]["value"], state["lambda"]["value"])


def test_bad_validation_inputs() -> None:
    agg = AutoLambda()
    J = torch.randn(2, 3)
    with pytest.raises(ValueError, match="2 entries but J has 3 columns"):
        agg.aggregate_validation(J, torch.ones(2))
    with pytest.raises(ValueError, match="1-D floating-point"):
        agg.set_validation(torch.ones(2, 3))
    with pytest.raises(ValueError, match="1-D floating-point"):
        agg.set_validation([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative number"):
        agg.set_validation(torch.ones(3), lr=-1.0)
    with pytest.raises(ValueError, match="one per column"):
        agg.set_validation(torch.ones(3), lr=torch.ones(2))
    with pytest.raises(NonFiniteError, match="validation gradient is not finite"):
        agg.aggregate_validation(J, torch.tensor([1.0, float("nan"), 0.0]))
    assert agg.lam is None
    # check_finite=False skips it: NaN propagates.
    out = agg.aggregate_validation(J, torch.tensor([1.0, float("nan"), 0.0]), check_finite=False)
    assert bool(out.weights.isnan().all())
    with pytest.raises(NonFiniteError, match="task 1"):
        AutoLambda().aggregate_validation(torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]),
                                          torch.ones(2))


def test_constructor_checks() -> None:
    with pytest.raises(TypeError, match="init must be a finite number"):
        AutoLambda(init="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learning rate"):
        AutoLambda(lr=0.0)
    with pytest.raises(ValueError, match="optimizer must be"):
        AutoLambda(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approximation must be one of"):
        AutoLambda(approximation="second")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        AutoLambda(primary=[0, 0])
    with pytest.raises(ValueError, match="non-negative task indices"):
        AutoLambda(primary=[-1])
    with pytest.raises(ValueError, match="do not exist"):
        AutoLambda(primary=[3]).primary_mask(3)
    assert AutoLambda(primary=[2, 0]).primary_mask(3) == [True, False, True]


def test_registry_entry_and_attributes() -> None:
    for name in ("autolambda", "auto-lambda", "auto_lambda", "Auto-Lambda"):
        assert isinstance(get(name), AutoLambda)
        assert reg.needs_validation(name)
    assert not reg.needs_validation("mgda")
    assert "autolambda" in reg.available() and "autolambda+tension" not in reg.available()
    with pytest.raises(ValueError, match="loss weighting"):
        get("autolambda+tension")
    assert AutoLambda.stateful and not AutoLambda.random and not AutoLambda.needs_losses
    assert AutoLambda().reads == "jacobian"  # J u: cross products with g_val, not in G
    assert "TMLR 2022" in AutoLambda.paper and AutoLambda.summary
    assert repr(get("autolambda", primary=[1])) == (
        "AutoLambda(init=0.1, lr=0.0001, optimizer='adam', primary=[1], approximation='unrolled')")


def test_scale_convention_is_unnormalised_numerically() -> None:
    """Neither ``T g`` on ``T`` equal rows (``0.1 T g`` at the start) nor weights summing to 1."""
    assert scale_convention("autolambda") == "unnormalised"
    assert scale_convention("autolambda*T") == "unnormalised"
    g = torch.randn(5, dtype=torch.float64)
    for T in (2, 3, 5):
        agg = Fed(torch.randn(5, dtype=torch.float64))
        out = agg.aggregate(g.expand(T, -1).clone())
        assert not torch.allclose(out.direction, T * g, rtol=1e-3)
        assert abs(float(out.weights.sum()) - 1.0) > 1e-3


def test_rescaled_form_reads_the_staged_input() -> None:
    agg = get("autolambda*T", lr=0.1, optimizer="sgd")
    J = torch.eye(2, dtype=torch.float64)
    agg.set_validation(torch.tensor([1.0, -1.0], dtype=torch.float64))
    out = agg.aggregate(J)
    assert_close(out.weights, 2 * torch.tensor([0.2, 0.0], dtype=torch.float64), rtol=1e-12)


def test_zero_rows_and_nonfinite_losses() -> None:
    """What the every-name tests check of the others (they run no validation batch): zero rows
    give a finite direction (their meta-gradient is 0), a non-finite loss names its task."""
    J = torch.randn(3, 7)
    for case in (J.index_fill(0, torch.tensor([1]), 0.0), torch.zeros(3, 7)):
        agg = Fed(torch.randn(7), lr=0.1)
        for _ in range(5):
            assert bool(torch.isfinite(agg(case, torch.tensor([0.5, 1.0, 2.0]))).all())
        assert bool((agg.diagnostics["meta_grad"][1] == 0).all())
    with pytest.raises(NonFiniteError, match="task 3 \\(value 2 of losses\\)"):
        Fed(torch.ones(7)).aggregate(J, torch.tensor([1.0, 1.0, float("nan")]),
                                     present=[True, False, True, True])
