"""Tests of the XOR/AND ablation benchmark (benchmarks/tensioner_logic_gates.py).

The benchmark trains its runs with batched tensors and its own batched T = 2 direction math;
these tests prove that equal to the library: whole training runs against
``MultiTaskOptimizer`` + the library aggregators, the direction math against the library
aggregators on generated matrices (hypothesis), the manual backprop against autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ._helpers import load_benchmark

tlg = load_benchmark("tensioner_logic_gates")


# ---------------------------------------------------------------------------------------------
# Whole runs: batched training == MultiTaskOptimizer + library aggregators


@pytest.mark.parametrize("method", list(tlg.METHODS))
def test_batched_training_equals_library(method):
    # c = 10 and the fixed init is where the paper's differences are; c = 1 and the varied init
    # are covered by test_check_cli below.  60 epochs = 120 steps, 110 of them tensioned.
    rep = tlg.check([method], seeds=[0, 3], lrs=[5e-2], epochs=60, scales=[10.0], protocols=["paper"])
    r = rep[method]
    assert r["runs"] == 2
    assert r["max_param_diff"] < 1e-10
    if tlg.METHODS[method].tension:
        assert r["tension_steps"] == 2 * (120 - tlg.WINDOW)
        # The authors' segment fix must have been exercised by the compared runs.
        assert r["segment_steps"] > 0


def test_check_cli(capsys):
    # The --check entry point on the other protocol and scale, and a second learning rate.
    assert tlg.main(["--check", "--check-seeds", "1", "--check-epochs", "25", "--check-lrs", "0.01",
                     "--methods", "sum", "mgda+tension", "central+tension", "single-xor"]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out


def test_check_detects_a_mismatch(monkeypatch):
    # The check is not vacuous: perturb the batched tension factors and it must fail.
    real = tlg.tension_factors
    monkeypatch.setattr(tlg, "tension_factors", lambda delta, alpha: real(delta, alpha) * 1.001)
    with pytest.raises(AssertionError, match="differs"):
        tlg.check(["central+tension"], seeds=[0], lrs=[5e-2], epochs=15, scales=[10.0], protocols=["paper"])


# ---------------------------------------------------------------------------------------------
# The batched direction math against the library aggregators, row by row (hypothesis)


def _library_directions(method, Js, losses):
    """Library directions for a sequence of steps: Js [S, R, T, D], losses [S, R, T]."""
    S, R = Js.shape[:2]
    aggs = [tlg.make_aggregator(method) for _ in range(R)]
    out = torch.empty(S, R, Js.shape[-1], dtype=Js.dtype)
    for s in range(S):
        for r in range(R):
            out[s, r] = aggs[r](Js[s, r], losses[s, r])
    return out


def _batched_directions(method, Js, losses):
    S, R, T, _ = Js.shape
    m = tlg.METHODS[method]
    tension = tlg.BatchedTension(R, T, Js.dtype) if m.tension else None
    active = torch.ones(R, dtype=torch.bool)
    out = torch.empty(S, R, Js.shape[-1], dtype=Js.dtype)
    fired = torch.zeros(R, dtype=torch.long)
    projected = torch.zeros(R, dtype=torch.long)
    for s in range(S):
        J = Js[s]
        G = J @ J.transpose(1, 2)
        v = torch.einsum("rt,rtd->rd", tlg.batched_base_weights(m.base, G), J)
        if tension is not None:
            d, f, p = tension(J, G, v, losses[s], active)
            fired += f
            projected += p
        else:
            d = v
        out[s] = d
    return out, fired, projected


@st.composite
def step_sequences(draw):
    """A sequence of J's for R runs: random, near-opposite and colinear pairs, zero-ish rows,
    scales 1e-4..1e3 and a task whose gradient grows (what the tensioner reacts to)."""
    S = draw(st.integers(12, 18))
    R = draw(st.integers(1, 4))
    D = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "opposite", "colinear", "growing", "tiny"]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-4, 3))
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((S, R, 2, D))
    if kind == "opposite":
        J[:, :, 1] = -J[:, :, 0] * rng.uniform(0.1, 10, size=(S, R, 1)) + 0.05 * J[:, :, 1]
    elif kind == "colinear":
        J[:, :, 1] = J[:, :, 0] * rng.uniform(0.1, 10, size=(S, R, 1))
    elif kind == "growing":
        J[:, :, 1] *= np.geomspace(1, 100, S)[:, None, None]
    elif kind == "tiny":
        J[:, :, 0] *= 1e-6
    losses = rng.uniform(1e-4, 10, size=(S, R, 2))
    return (torch.tensor(J * 10.0**log_scale, dtype=torch.float64),
            torch.tensor(losses, dtype=torch.float64))


TWO_TASK = [name for name, m in tlg.METHODS.items() if len(m.tasks) == 2]


@settings(max_examples=25, deadline=None)
@given(seq=step_sequences(), method=st.sampled_from(TWO_TASK))
def test_batched_directions_equal_library(seq, method):
    Js, losses = seq
    want = _library_directions(method, Js, losses)
    got, _, _ = _batched_directions(method, Js, losses)
    # Tensions are unit vectors whatever the gradients' scale: the error bound has a unit term.
    bound = 1e-9 * (Js.norm(dim=-1).amax(-1) + 1.0)
    assert bool(((got - want).norm(dim=-1) <= bound).all()), (got - want).abs().max()


def test_segment_and_projection_branches_match_library():
    # Near-opposite gradients with one growing: the segment fix fires often; batched and library
    # agree on all of it.  For T = 2 the projection fallback never runs: v_n = beta v + a_1 g_1 +
    # a_2 g_2 with beta + a_1 + a_2 = 1 lies on the line through g_1 and g_2, where the feasible
    # points form an interval, and one segment fix lands on its nearer end (so the library's
    # "segment" is exactly the authors' two-task fix).
    rng = np.random.default_rng(7)
    S, R, D = 30, 20, 3
    g0 = rng.standard_normal((S, R, D))
    g1 = -g0 * rng.uniform(0.2, 5, size=(S, R, 1)) + 0.3 * rng.standard_normal((S, R, D))
    g1 *= np.geomspace(1, 50, S)[:, None, None]
    Js = torch.tensor(np.stack([g0, g1], axis=2) * 1e-2, dtype=torch.float64)
    losses = torch.tensor(rng.uniform(1e-3, 5, size=(S, R, 2)), dtype=torch.float64)
    for method in ("central+tension", "mgda+tension", "mgda-sener+tension"):
        want = _library_directions(method, Js, losses)
        got, fired, projected = _batched_directions(method, Js, losses)
        assert bool(((got - want).norm(dim=-1) <= 1e-9 * (Js.norm(dim=-1).amax(-1) + 1.0)).all())
        assert int(fired.sum()) > 0
        assert int(projected.sum()) == 0
        # Every final direction is feasible for both tasks after warm-up.
        Jd = torch.einsum("srtd,srd->srt", Js, got)[tlg.WINDOW:]
        norms = Js.norm(dim=-1)[tlg.WINDOW:] * got.norm(dim=-1)[tlg.WINDOW:, :, None]
        assert bool((Jd >= -1e-9 * norms).all())


# ---------------------------------------------------------------------------------------------
# The model's manual backprop against autograd


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 2), R=st.integers(1, 5),
       log_scale=st.floats(-2, 1.5))
def test_forward_backward_matches_autograd(seed, T, R, log_scale):
    g = torch.Generator().manual_seed(seed)
    s = 10.0**log_scale
    W1 = (torch.randn(R, 2, 2, generator=g, dtype=torch.float64) * s).requires_grad_()
    b1 = (torch.randn(R, 2, generator=g, dtype=torch.float64) * s).requires_grad_()
    Wh = (torch.randn(R, T, 2, generator=g, dtype=torch.float64) * s).requires_grad_()
    bh = (torch.randn(R, T, generator=g, dtype=torch.float64) * s).requires_grad_()
    x = torch.randint(0, 2, (R, 2, 2), generator=g).to(torch.float64)
    y = torch.randn(R, T, 2, generator=g, dtype=torch.float64) * 10
    losses, J, gWh, gbh = tlg.forward_backward(W1, b1, Wh, bh, x, y)
    for r in range(R):
        for t in range(T):
            z = torch.sigmoid(x[r] @ W1[r].T + b1[r])
            loss = torch.nn.functional.mse_loss(z @ Wh[r, t] + bh[r, t], y[r, t])
            gw1, gb1, gwh, gbh_ = torch.autograd.grad(loss, [W1, b1, Wh, bh])
            assert torch.allclose(losses[r, t], loss)
            assert torch.allclose(J[r, t], torch.cat([gw1[r].reshape(-1), gb1[r]]), rtol=1e-12, atol=1e-14)
            assert torch.allclose(gWh[r, t], gwh[r, t], rtol=1e-12, atol=1e-14)
            assert torch.allclose(gbh[r, t], gbh_[r, t], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Protocol details and the summaries


def test_init_follows_the_authors_model_selector():
    enc, heads = tlg.init_model(136, ("xor", "and"), torch.float64)
    torch.manual_seed(136)
    ref_enc = torch.nn.Linear(2, 2)
    ref_and = torch.nn.Linear(2, 1)
    ref_xor = torch.nn.Linear(2, 1)
    assert torch.equal(enc.weight, ref_enc.weight.double())
    assert torch.equal(heads["and"].weight, ref_and.weight.double())
    assert torch.equal(heads["xor"].bias, ref_xor.bias.double())
    # A single-XOR run creates only the XOR head, right after the shared layer.
    _, single = tlg.init_model(136, ("xor",), torch.float64)
    assert torch.equal(single["xor"].weight, ref_and.weight.double())


def test_batch_orders_are_seeded_permutations():
    a = tlg.batch_orders(5, 50)
    assert a.shape == (50, 4)
    assert all(sorted(row) == [0, 1, 2, 3] for row in a.tolist())
    assert np.array_equal(a, tlg.batch_orders(5, 50))
    assert not np.array_equal(a, tlg.batch_orders(6, 50))


def test_convergence_rule_and_freeze():
    # A run's epochs is the epoch its last task converged; a frozen run stops changing.
    runs = [tlg.Run("paper", 10.0, 0, 5e-2), tlg.Run("paper", 10.0, 0, 5e-5)]
    res = tlg.train_batched("central", runs, 400, record=True)
    assert res.epoch_losses is not None
    conv = res.conv[0]
    assert bool((conv > 0).all())
    E = int(res.epochs[0])
    assert E == int(conv.max())
    T = 2
    mean_loss = res.epoch_losses[0] / (4 * T)
    for t in range(T):
        first = int(conv[t])
        assert mean_loss[first - 1, t] < tlg.THRESHOLD
        assert bool((mean_loss[: first - 1, t] >= tlg.THRESHOLD).all())
    # Run 0 is frozen after epoch E (its full-batch loss stays put); the loop went on for run 1.
    after = res.epoch_losses[0, E:]
    assert after.shape[0] == 400 - E > 0
    assert torch.allclose(after, after[:1].expand_as(after), rtol=1e-12, atol=0)
    assert not torch.allclose(res.epoch_losses[1, -1], res.epoch_losses[1, -2], rtol=1e-12, atol=0)
    assert int(res.epochs[1]) == 0  # lr 5e-5 does not converge


def test_summarise_selection_rules():
    grid = np.zeros((3, len(tlg.LRS)), dtype=np.int64)
    k_fast, k_sure = tlg.LRS.index(5e-2), tlg.LRS.index(1e-2)
    grid[:, k_sure] = [900, 1000, 1100]  # all converge
    grid[:2, k_fast] = [300, 100]  # faster but one seed fails
    s = tlg.summarise(grid)
    assert s["best_lr"] == 1e-2  # rate first
    # Epochs reported as the paper counts them: 0-based index of the last epoch.
    assert s["best"] == pytest.approx((100.0, 999.0, np.std([900, 1000, 1100])))
    rate, mean, _ = s["per_seed"]  # per seed the fastest converged lr
    assert rate == 100.0 and mean == pytest.approx((300 + 100 + 1100) / 3 - 1)
    assert s["per_lr"][0][0] == 0.0


def test_sener_weights_clip_only_vertex_solutions():
    from torch_mtlgrad.aggregators._solvers import min_norm_weights

    # Interior solution: the exact min-norm weights.
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    G = J @ J.T
    assert torch.allclose(tlg.sener_weights(G[None])[0], min_norm_weights(G))
    # Vertex solutions (one gradient is the min-norm point): 0.999 / 0.001 instead of 1 / 0.
    J = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    G = J @ J.T
    assert torch.allclose(min_norm_weights(G), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(tlg.sener_weights(G[None])[0], torch.tensor([0.999, 0.001], dtype=torch.float64))
    G2 = G.flip(0).flip(1)
    assert torch.allclose(tlg.sener_weights(G2[None])[0], torch.tensor([0.001, 0.999], dtype=torch.float64))
    with pytest.raises(ValueError, match="two-task"):
        tlg.SenerMinNorm()(torch.ones(3, 2))
