"""``MultiTaskOptimizer(..., aggregator="autolambda", validation_losses=fn)``: Auto-Lambda (Liu,
James, Davison and Johns, TMLR 2022) through the optimizer, against an independent float64
reference that unrolls the virtual step with autograd (``theta'(lambda)`` built with
``create_graph=True``, ``L_val(theta')`` differentiated in ``lambda``: the bilevel gradient itself,
not the formula ``-eta J g_val``), and against the authors' central finite difference; then the
first-order variant, checkpoints, absent tasks, the legacy loop, the non-finite policy and every
error of the option."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from torch_mtlgrad import MultiTaskOptimizer, NonFiniteError
from torch_mtlgrad.aggregators.autolambda import AutoLambda

T = 3
F = nn.functional


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 4).to(dtype)
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(T)]).to(dtype)

    def forward(self, x: Tensor) -> list[Tensor]:
        z = torch.tanh(self.enc(x))
        return [h(z) for h in self.heads]


def data(dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=dtype)
    return x, [torch.randn(16, 1, generator=g, dtype=dtype) for _ in range(T)]


def task_losses(outs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [F.mse_loss(o, y) for o, y in zip(outs, ys)]


SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def ours(steps: int, *, meta: str = "adam", meta_lr: float = 0.01, primary=None,
         approximation: str = "unrolled", state=None, net: Net | None = None, **opt_kw):
    net = net or Net()
    train, val = data(seed=1), data(seed=2)
    agg = AutoLambda(lr=meta_lr, optimizer=meta, primary=primary, approximation=approximation)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), **SGD), shared=net.enc,
                             aggregator=agg,
                             validation_losses=lambda: task_losses(net(val[0]), val[1]), **opt_kw)
    if state is not None:
        opt.load_state_dict(state)
    lams = []
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(task_losses(net(train[0]), train[1]))
        opt.step()
        lams.append(agg.lam.clone())
    return net, opt, lams


def reference(steps: int, *, meta: str = "adam", meta_lr: float = 0.01, primary=None,
              unrolled: bool = True):
    """Auto-Lambda by hand in float64: the virtual step of the authors' code (lr, weight decay,
    momentum buffer), differentiated through by autograd; the heads take the plain sum of their
    task gradients (the library's rule for task-specific parameters)."""
    net = Net()
    train, val = data(seed=1), data(seed=2)
    names = [n for n, _ in net.named_parameters()]
    shared = {n for n in names if n.startswith("enc.")}
    lam = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    meta_opt = (torch.optim.Adam([lam], lr=meta_lr) if meta == "adam"
                else torch.optim.SGD([lam], lr=meta_lr))
    bufs: dict[str, Tensor] = {}
    prim = [True] * T if primary is None else [t in primary for t in range(T)]
    lams = []
    for _ in range(steps):
        params = dict(net.named_parameters())
        losses = task_losses(net(train[0]), train[1])
        enc = [params[n] for n in names if n in shared]
        heads = [params[n] for n in names if n not in shared]
        g_enc = torch.autograd.grad(sum(lam[t] * losses[t] for t in range(T)), enc,
                                    create_graph=True)
        g_heads = torch.autograd.grad(sum(losses), heads, retain_graph=True)
        grads = dict(zip([n for n in names if n in shared], g_enc))
        grads.update(zip([n for n in names if n not in shared], g_heads))
        virtual = {}
        for n in names:
            p = params[n].detach()
            step = grads[n] + SGD["weight_decay"] * p
            if n in bufs:
                step = step + SGD["momentum"] * bufs[n]
            virtual[n] = p - SGD["lr"] * step if unrolled else p + 0.0 * step
        val_losses = task_losses(functional_call(net, virtual, (val[0],)), val[1])
        if not unrolled:  # g_val at theta: a first-order term only
            at = {n: params[n].detach().requires_grad_(True) for n in names}
            val_losses = task_losses(functional_call(net, at, (val[0],)), val[1])
            gv = torch.autograd.grad(sum(v for v, k in zip(val_losses, prim) if k),
                                     [at[n] for n in names if n in shared])
            hyper = torch.autograd.grad(
                sum((-SGD["lr"] * g * v).sum() for g, v in zip(g_enc, gv)), lam)[0]
        else:
            hyper = torch.autograd.grad(sum(v for v, k in zip(val_losses, prim) if k), lam)[0]
        meta_opt.zero_grad()
        lam.grad = hyper
        meta_opt.step()
        lams.append(lam.detach().clone())
        # The real step with the updated weights: SGD with momentum and weight decay.
        losses = task_losses(net(train[0]), train[1])
        g_enc = torch.autograd.grad(sum(lam.detach()[t] * losses[t] for t in range(T)), enc,
                                    retain_graph=True)
        g_heads = torch.autograd.grad(sum(losses), heads)
        grads = dict(zip([n for n in names if n in shared], g_enc))
        grads.update(zip([n for n in names if n not in shared], g_heads))
        with torch.no_grad():
            for n in names:
                p = params[n]
                d = grads[n] + SGD["weight_decay"] * p
                bufs[n] = d.clone() if n not in bufs else SGD["momentum"] * bufs[n] + d
                p -= SGD["lr"] * bufs[n]
    return net, lams


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("meta", ["adam", "sgd"])
@pytest.mark.parametrize("primary", [None, [0]])
def test_matches_the_unrolled_bilevel_gradient(meta: str, primary) -> None:
    meta_lr = 0.01 if meta == "adam" else 5.0
    net, _, lams = ours(4, meta=meta, meta_lr=meta_lr, primary=primary)
    ref_net, ref_lams = reference(4, meta=meta, meta_lr=meta_lr, primary=primary)
    assert _max_diff(lams, ref_lams) < 1e-12, _max_diff(lams, ref_lams)
    assert _max_diff(list(net.parameters()), list(ref_net.parameters())) < 1e-12
    assert not torch.allclose(lams[-1], torch.full((T,), 0.1, dtype=torch.float64))


def test_first_order_matches_its_reference() -> None:
    _, _, lams = ours(3, meta="sgd", meta_lr=5.0, approximation="first_order")
    _, ref_lams = reference(3, meta="sgd", meta_lr=5.0, unrolled=False)
    _, _, unrolled = ours(3, meta="sgd", meta_lr=5.0)
    assert _max_diff(lams, ref_lams) < 1e-12
    assert _max_diff(lams, unrolled) > 1e-8  # the look-ahead matters


def test_agrees_with_the_authors_finite_difference() -> None:
    """The authors' code: ``(L_t(theta + e d) - L_t(theta - e d)) / 2e``, ``d = g_val(theta')``
    over every parameter, ``e = 0.01 / ||d||``; the meta-gradient is ``-eta`` times it.  Here the
    heads' part of ``d . g_t`` is left out as in this library's update (their step does not
    depend on ``lambda``), so ``d`` is the shared parameters' part."""
    net = Net()
    train, val = data(seed=1), data(seed=2)
    agg = AutoLambda(lr=1.0, optimizer="sgd")
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.enc,
                             aggregator=agg,
                             validation_losses=lambda: task_losses(net(val[0]), val[1]))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    opt.backward(task_losses(net(train[0]), train[1]))
    meta_grad = agg.diagnostics["meta_grad"]
    # d = g_val at theta' (shared part), theta' by the virtual step with lambda = 0.1
    params = {n: p.detach().requires_grad_(True) for n, p in before.items()}
    losses = task_losses(functional_call(net, params, (train[0],)), train[1])
    grads = torch.autograd.grad(sum(0.1 * v for v in losses), list(params.values()),
                                retain_graph=True)
    heads = torch.autograd.grad(sum(losses), list(params.values()), allow_unused=True)
    virtual = {n: (before[n] - 0.1 * (g if n.startswith("enc.") else h)).requires_grad_(True)
               for (n, g), h in zip(zip(params, grads), heads)}
    vl = sum(task_losses(functional_call(net, virtual, (val[0],)), val[1]))
    d = dict(zip(virtual, torch.autograd.grad(vl, list(virtual.values()))))
    d = {n: v for n, v in d.items() if n.startswith("enc.")}
    eps = 0.01 / float(torch.cat([v.flatten() for v in d.values()]).norm())

    def at(sign: float) -> Tensor:
        p = {n: before[n] + sign * eps * d[n] if n in d else before[n] for n in before}
        return torch.stack(task_losses(functional_call(net, p, (train[0],)), train[1]))

    fd = -0.1 * (at(1.0) - at(-1.0)) / (2 * eps)
    rel = float((meta_grad - fd).abs().max() / fd.abs().max())
    print(f"relative difference to the authors' finite difference: {rel:.3g}")
    assert rel < 1e-4, rel  # O(e^2): the finite difference approximates J d


def test_parameters_come_back_bit_for_bit_and_a_kept_graph_stays_valid() -> None:
    net = Net()
    train, val = data(seed=1), data(seed=2)
    seen = []

    def fn():
        seen.append(net.enc.weight.detach().clone())
        return task_losses(net(val[0]), val[1])

    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), **SGD), shared=net.enc,
                             aggregator="autolambda", validation_losses=fn)
    ids = [(p.data_ptr(), p._version) for p in net.parameters()]
    snapshot = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    losses = task_losses(net(train[0]), train[1])
    opt.backward(losses, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, net.parameters()))
    assert [(p.data_ptr(), p._version) for p in net.parameters()] == ids
    assert not torch.equal(seen[0], snapshot[0])  # fn ran at the look-ahead theta'
    sum(losses).backward()  # the kept graph is intact


def test_resume_is_bit_exact() -> None:
    full_net, _, full = ours(4)
    net, opt, _ = ours(2)
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in net.parameters()]
    fresh = Net()
    with torch.no_grad():
        for p, v in zip(fresh.parameters(), params):
            p.copy_(v)
    resumed_net, _, resumed = ours(2, state=state, net=fresh)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed))
    assert all(torch.equal(a, b) for a, b in zip(full_net.parameters(), resumed_net.parameters()))


def test_absent_task_keeps_its_lambda() -> None:
    net = Net()
    train, val = data(seed=1), data(seed=2)
    agg = AutoLambda(lr=0.01)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.enc,
                             aggregator=agg,
                             validation_losses=lambda: task_losses(net(val[0]), val[1]))
    for present in ([True] * 3, [True, False, True]):
        opt.zero_grad()
        losses = task_losses(net(train[0]), train[1])
        lam = agg.lam.clone() if agg.lam is not None else None
        opt.backward([v if k else None for v, k in zip(losses, present)])
        opt.step()
    assert agg.lam[1] == lam[1] and agg.lam[0] != lam[0]
    assert opt.diagnostics["weights"][1] == 0.0


def test_legacy_loop_gets_the_validation_step_too() -> None:
    net = Net()
    train, val = data(seed=1), data(seed=2)
    ref_net, _, ref_lams = ours(1, meta="sgd", meta_lr=5.0)
    agg = AutoLambda(lr=5.0, optimizer="sgd")
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), **SGD), shared=net.enc,
                             aggregator=agg, num_tasks=T,
                             validation_losses=lambda: task_losses(net(val[0]), val[1]))
    opt.zero_grad()
    losses = task_losses(net(train[0]), train[1])
    for t, loss in enumerate(losses):
        with opt.task(t):
            loss.backward(retain_graph=t < T - 1)
    opt.step()
    assert float((agg.lam - ref_lams[0]).abs().max()) < 1e-12
    assert _max_diff(list(net.parameters()), list(ref_net.parameters())) < 1e-12


def test_validation_objective_forms() -> None:
    """``fn`` may return the per-task losses (None for a task without one), a 1-D tensor of them
    or the objective itself: the same step."""
    train, val = data(seed=1), data(seed=2)
    results = []
    for form in ("list", "tensor", "scalar", "none"):
        net = Net()

        def fn(net=net, form=form):
            v = task_losses(net(val[0]), val[1])
            if form == "tensor":
                return torch.stack(v)
            if form == "scalar":
                return v[0] + v[2]
            return [v[0], None if form == "none" else v[1], v[2]]

        agg = AutoLambda(lr=0.01, primary=[0, 2])
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.enc,
                                 aggregator=agg, validation_losses=fn)
        opt.zero_grad()
        opt.backward(task_losses(net(train[0]), train[1]))
        results.append(agg.lam.clone())
    assert all(torch.allclose(r, results[0], rtol=1e-14, atol=0) for r in results)


def test_errors() -> None:
    net = Net()
    train = data(seed=1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    # The method without a validation batch: a clear error at the first step.
    opt = MultiTaskOptimizer(sgd, shared=net.enc, aggregator="auto-lambda")
    opt.zero_grad()
    with pytest.raises(ValueError, match="pass validation_losses=fn to MultiTaskOptimizer"):
        opt.backward(task_losses(net(train[0]), train[1]))
    with pytest.raises(ValueError, match="reads none"):
        MultiTaskOptimizer(sgd, shared=net.enc, aggregator="mgda", validation_losses=lambda: 0)
    with pytest.raises(TypeError, match="must be a callable"):
        MultiTaskOptimizer(sgd, shared=net.enc, aggregator="autolambda", validation_losses=3)
    for bad, err, msg in [(lambda: [torch.ones(())], ValueError, "got 1 entries"),
                          (lambda: "x", TypeError, "got str"),
                          (lambda: [None, None, None], ValueError, "no loss for any primary"),
                          (lambda: torch.ones(2, 2), ValueError, "shape \\(2, 2\\)")]:
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.enc,
                                 aggregator="autolambda", validation_losses=bad)
        before = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad()
        with pytest.raises(err, match=msg):
            opt.backward(task_losses(net(train[0]), train[1]))
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
        assert opt.aggregator.lam is None


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_validation_gradient_follows_the_policy(policy: str) -> None:
    net = Net()
    train, val = data(seed=1), data(seed=2)
    agg = AutoLambda(lr=0.01)
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), shared=net.enc,
                             aggregator=agg, nonfinite=policy,
                             validation_losses=lambda: [v * float("nan") for v in
                                                        task_losses(net(val[0]), val[1])])
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="validation losses"):
            opt.backward(task_losses(net(train[0]), train[1]))
    else:
        opt.backward(task_losses(net(train[0]), train[1]))
        opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert agg.lam is None


def test_under_a_grad_scaler_the_look_ahead_reads_the_unscaled_gradients() -> None:
    """With GradScaler the captured gradients are times its scale: the look-ahead divides them
    back, so the run equals the one without it (float32; the scale a power of two)."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        net = Net(torch.float32)
        train, val = data(torch.float32, seed=1), data(torch.float32, seed=2)
        agg = AutoLambda(lr=0.01)
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), **SGD), shared=net.enc,
                                 aggregator=agg, scaler=scaler,
                                 validation_losses=lambda net=net, val=val: task_losses(
                                     net(val[0]), val[1]))
        for _ in range(3):
            opt.zero_grad()
            opt.backward(task_losses(net(train[0]), train[1]))
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        runs.append((agg.lam.clone(), [p.detach().clone() for p in net.parameters()]))
    (lam_a, p_a), (lam_b, p_b) = runs
    torch.testing.assert_close(lam_b, lam_a, rtol=1e-6, atol=1e-9)
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
