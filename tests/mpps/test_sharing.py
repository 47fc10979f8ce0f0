"""The MPPS module: hooks, masking semantics, objective, estimators, schedule, state."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Normal
from torch.distributions import kl_divergence as td_kl

from torch_mtlgrad.mpps import MPPS, FullShare, Linear, Separ, StepN
from torch_mtlgrad.mpps.ec import distribution_ec, neuron_ec
from torch_mtlgrad.mpps.masks import exclusive_phi, logit

FAMILIES = ["bernoulli", "gaussian"]


def mlp(depth: int = 3, width: int = 8, d_in: int = 5) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 6),
        nn.Tanh(),
    )


def setup(family: str = "bernoulli", t: int = 3, seed: int = 0, backbone: str = "mlp", **kw):
    torch.manual_seed(seed)
    net = mlp() if backbone == "mlp" else cnn()
    width = 8 if backbone == "mlp" else 6
    heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(t)])
    kw.setdefault("scheduler", 6)
    mpps = MPPS(net, t, family=family, seed=seed + 1, **kw)  # type: ignore[arg-type]
    return net, heads, mpps


def data(t: int = 3, backbone: str = "mlp", n: int = 4, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(n, 5, generator=g)
        if backbone == "mlp"
        else torch.randn(n, 2, 5, 5, generator=g)
    )
    return x, torch.randn(t, n, 1, generator=g)


def task_loss(net, heads, x, y):
    return lambda t: ((heads[t](net(x)) - y[t]) ** 2).mean()


# ---------------------------------------------------------------- layer selection and hooks
def test_default_layers_are_the_last_six_conv2d_linear() -> None:
    net = nn.Sequential(
        *[nn.Conv2d(3, 3, 1) for _ in range(4)], nn.Flatten(), *[nn.Linear(3, 3) for _ in range(4)]
    )
    mpps = MPPS(net, 2, scheduler=3)
    assert mpps.layer_names == ["2", "3", "5", "6", "7", "8"]
    assert [tuple(a.shape) for a in mpps.logits] == [(3, 2)] * 6
    assert MPPS(net, 2, scheduler=3, layers=2).layer_names == ["7", "8"]
    assert MPPS(mlp(2), 2, scheduler=3).layer_names == ["0", "2"]  # fewer than 6: all of them


def test_layers_by_module_or_name() -> None:
    net = mlp(3)
    assert MPPS(net, 2, scheduler=3, layers=[net[2], "4"]).layer_names == ["2", "4"]
    conv1d = nn.Sequential(nn.Conv1d(2, 4, 3))
    assert [tuple(a.shape) for a in MPPS(conv1d, 2, scheduler=3, layers=[conv1d[0]]).logits] == [
        (4, 2)
    ]
    with pytest.raises(ValueError, match="not part of the backbone"):
        MPPS(net, 2, scheduler=3, layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="Tanh"):
        MPPS(net, 2, scheduler=3, layers=[net[1]])
    with pytest.raises(ValueError, match="no submodule"):
        MPPS(net, 2, scheduler=3, layers=["nope"])
    with pytest.raises(ValueError, match="twice"):
        MPPS(net, 2, scheduler=3, layers=[net[0], "0"])
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        MPPS(nn.Sequential(nn.ReLU()), 2, scheduler=3)
    with pytest.raises(ValueError, match="positive"):
        MPPS(net, 2, scheduler=3, layers=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model_exactly(family: str) -> None:
    net = cnn().train()
    x, _ = data(backbone="cnn")
    before = net(x)
    sd_before = {k: v.clone() for k, v in net.state_dict().items()}
    hooks_before = [dict(m._forward_hooks) for m in net.modules()]
    mpps = MPPS(net, 3, family=family, scheduler=3)  # type: ignore[arg-type]
    assert not any(p is q for p in mpps.parameters() for q in net.parameters())
    assert torch.equal(net(x), before)  # attached, no task selected: pass-through
    with mpps.task(1):
        masked = net(x)
    assert not torch.equal(masked, before)
    mpps.remove()
    assert not mpps.attached
    assert [dict(m._forward_hooks) for m in net.modules()] == hooks_before
    assert torch.equal(net(x), before)
    assert net.state_dict().keys() == sd_before.keys()
    assert all(torch.equal(v, sd_before[k]) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError, match="removed"), mpps.task(0):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_uses_the_full_backbone(family: str) -> None:
    net, _, mpps = setup(family, backbone="cnn")
    x, _ = data(backbone="cnn")
    full = net.eval()(x)
    with mpps.task(2):
        assert torch.equal(net(x), full)
    with mpps.batched():
        assert torch.equal(net(mpps.repeat(x)), full.repeat(3, 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_multiplies_neurons_by_the_task_mask(family: str) -> None:
    """Linear: output features; Conv2d: output channels; owners keep their neurons exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Flatten(), nn.Linear(54, 6))
    mpps = MPPS(net, 3, family=family, scheduler=4)  # type: ignore[arg-type]
    mpps.remove()  # compute the reference with the plain layers
    x = torch.randn(3, 2, 5, 5)
    torch.manual_seed(0)
    net2 = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Flatten(), nn.Linear(54, 6))
    mpps = MPPS(net2, 3, family=family, scheduler=4)  # type: ignore[arg-type]
    with torch.no_grad():
        for a in mpps.logits:  # make guests non-trivial
            a.copy_(torch.randn_like(a))
    for t in range(3):
        with mpps.task(t):
            out = net2(x)
        m_conv, m_lin = mpps._drawn[t]
        ref = net[2](net[1](net[0](x) * m_conv.view(1, 6, 1, 1))) * m_lin
        assert torch.allclose(out, ref, atol=1e-6)
        for a, m in zip(mpps.logits, (m_conv, m_lin)):
            owned = a.argmax(1) == t
            assert bool((m[owned] == 1).all())
            if family == "bernoulli":
                assert bool(((m == 0) | (m == 1)).all())
        mpps._drawn.clear()


def test_bernoulli_masks_through_the_hook_match_phi() -> None:
    """A layer whose output is 1 everywhere shows the mask itself: its mean is phi on guests."""
    layer = nn.Linear(1, 6)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    mpps = MPPS(nn.Sequential(layer), 2, scheduler=3, seed=5)
    phi = torch.tensor([[0.9, 0.2], [0.8, 0.5], [0.7, 0.6], [0.1, 0.9], [0.3, 0.8], [0.45, 0.55]])
    with torch.no_grad():
        mpps.logits[0].copy_(logit(phi))
    k = 2000
    x = torch.ones(1, 1)
    outs = []
    for _ in range(k // 2):
        with mpps.batched():
            outs.append(layer(mpps.repeat(x)))  # [2, 6]: one draw per task
    m = torch.stack(outs)  # [k/2, T, N]
    own = phi.argmax(1)
    for t in range(2):
        guest = own != t
        assert bool((m[:, t, ~guest] == 1).all())
        mean = m[:, t, guest].mean(0)
        p = phi[guest, t]
        assert bool(((mean - p).abs() <= 5 * torch.sqrt(p * (1 - p) / (k // 2))).all()), (mean, p)


# ---------------------------------------------------------------- sequential vs batched
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_batched_form_equals_sequential_form(family: str, backbone: str) -> None:
    grads = []
    values = []
    for batched in (False, True):
        net, heads, mpps = setup(family, backbone=backbone)
        with torch.no_grad():
            for a in mpps.logits:
                a.add_(torch.randn(a.shape, generator=torch.Generator().manual_seed(3)))
        x, y = data(backbone=backbone)
        if batched:

            def all_losses(net=net, heads=heads, mpps=mpps, x=x, y=y):
                feats = net(mpps.repeat(x)).chunk(3)
                return [((heads[t](feats[t]) - y[t]) ** 2).mean() for t in range(3)]

            losses = mpps.losses_batched(all_losses)
        else:
            losses = mpps.losses(task_loss(net, heads, x, y))
        params = [*net.parameters(), *heads.parameters(), *mpps.parameters()]
        grads.append(torch.autograd.grad(sum(losses), params))
        values.append(torch.stack([v.detach() for v in losses]))
    assert torch.allclose(values[0], values[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_batched_form_checks_the_batch_layout() -> None:
    net, _, mpps = setup()
    with pytest.raises(ValueError, match="T \\* batch"), mpps.batched():
        net(torch.randn(4, 5))


# ---------------------------------------------------------------- objective and gradients
@pytest.mark.parametrize("family", FAMILIES)
def test_objective_value_is_loss_plus_beta_kl(family: str) -> None:
    net, heads, mpps = setup(family, beta=0.7)
    with torch.no_grad():
        for i, a in enumerate(mpps.logits):
            a.add_(0.5 * torch.randn_like(a))
    x, y = data()
    raw = []
    for t in range(3):
        with mpps.task(t):
            raw.append(task_loss(net, heads, x, y)(t))
    out = mpps.regularize(raw)
    # KL reference from torch.distributions over all neurons of all layers
    ref = torch.zeros(3)
    for i, a in enumerate(mpps.logits):
        q, p = torch.sigmoid(a.detach()), mpps.target[i]
        if family == "bernoulli":
            kl = td_kl(Bernoulli(probs=q), Bernoulli(probs=p))
        else:
            kl = td_kl(
                Normal(torch.ones_like(q), torch.sqrt((1 - q) / q)),
                Normal(torch.ones_like(p), torch.sqrt((1 - p) / p)),
            )
        ref += kl.sum(0)
    assert torch.allclose(mpps.diagnostics["kl"], ref, atol=1e-5)
    for t in range(3):
        assert torch.allclose(out[t].detach(), raw[t].detach() + 0.7 * ref[t], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_is_zero_at_initialisation(family: str) -> None:
    _, _, mpps = setup(family)
    assert torch.equal(mpps.kl().detach(), torch.zeros(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_loss_reaches_only_its_own_phi_column(family: str) -> None:
    """So under MultiTaskOptimizer the summed gradient of phi equals each column's own gradient."""
    net, heads, mpps = setup(family)
    with torch.no_grad():
        for a in mpps.logits:
            a.add_(torch.randn_like(a))
    x, y = data()
    for _ in range(2):  # second step has a non-zero baseline
        losses = mpps.losses(task_loss(net, heads, x, y))
        for s, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, list(mpps.parameters()), retain_graph=True)
            for g in grads:
                other = [t for t in range(3) if t != s]
                assert torch.equal(g[:, other], torch.zeros_like(g[:, other]))
                assert bool(g[:, s].abs().sum() > 0)


def _exact_expected_loss_grad(mpps: MPPS, f, t: int) -> torch.Tensor:
    """d E_m[L_t] / d logits[:, t] by enumerating every guest mask of a one-layer Bernoulli MPPS."""
    a = mpps.logits[0].detach().double().clone().requires_grad_(True)
    guests = (a.detach().argmax(1) != t).nonzero().flatten().tolist()
    phi = torch.sigmoid(a[:, t])
    total = torch.zeros((), dtype=torch.float64)
    for bits in itertools.product([0.0, 1.0], repeat=len(guests)):
        m = torch.ones(a.shape[0], dtype=torch.float64)
        prob = torch.ones((), dtype=torch.float64)
        for n, b in zip(guests, bits):
            m[n] = b
            prob = prob * (phi[n] if b else 1 - phi[n])
        total = total + prob * f(m)
    (g,) = torch.autograd.grad(total, a)
    return g[:, t]


PHI6 = [[0.9, 0.3], [0.8, 0.6], [0.7, 0.45], [0.2, 0.85], [0.5, 0.75], [0.35, 0.95]]


def _reinforce_problem(decay: float | None):
    """One layer of 6 neurons, two tasks (3 guests each), a loss non-linear in the mask."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 6)
    x = torch.randn(2, 3)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 2.0])
    target = torch.tensor([0.3, -0.4])
    mpps = MPPS(
        nn.Sequential(layer),
        2,
        scheduler=3,
        family="bernoulli",
        beta=0.0,
        baseline_decay=decay,
        seed=11,
    )
    with torch.no_grad():
        mpps.logits[0].copy_(logit(torch.tensor(PHI6)))
    feats = layer(x).detach().double()

    def f(m: torch.Tensor, t: int) -> torch.Tensor:  # the loss as a function of the mask, float64
        z = torch.tanh(feats * m) @ w.double()
        return ((z - target.double()) ** 2).mean() * (1 + t)

    exact = torch.stack(
        [_exact_expected_loss_grad(mpps, lambda m, t=t: f(m, t), t) for t in range(2)], 1
    )
    own = mpps.logits[0].argmax(1)
    assert torch.equal(exact[torch.arange(6), own], torch.zeros(6, dtype=torch.float64))

    def estimate() -> torch.Tensor:
        losses = mpps.losses(lambda t: ((torch.tanh(layer(x)) @ w - target) ** 2).mean() * (1 + t))
        (g,) = torch.autograd.grad(sum(losses), mpps.logits[0])
        return g.double()

    return mpps, exact, estimate


@pytest.mark.parametrize("baseline", [0.0, 1.3])
def test_reinforce_estimator_is_exactly_unbiased(
    monkeypatch: pytest.MonkeyPatch, baseline: float
) -> None:
    """E over every guest mask, weighted by q(m), of MPPS's gradient == the exact gradient.

    The sampler is replaced by one that returns each mask in turn (the sampler's own statistics
    are tested above); any baseline independent of the mask leaves the expectation unchanged.
    """
    import torch_mtlgrad.mpps.hooks as hooks_mod  # where the masks are drawn

    mpps, exact, estimate = _reinforce_problem(0.5)
    phi = torch.sigmoid(mpps.logits[0].detach().double())
    own = phi.argmax(1)
    forced: dict[int, torch.Tensor] = {}

    def fake_sample(logits, is_owner, family, generator=None):
        t = 0 if torch.equal(is_owner, own == 0) else 1  # which task's mask is being drawn
        return torch.where(is_owner, torch.ones_like(logits), forced[t].to(logits.dtype))

    monkeypatch.setattr(hooks_mod, "sample_masks", fake_sample)
    guests = [(own != t).nonzero().flatten().tolist() for t in range(2)]
    total = torch.zeros(6, 2, dtype=torch.float64)
    for bits0 in itertools.product([0.0, 1.0], repeat=3):
        for bits1 in itertools.product([0.0, 1.0], repeat=3):
            prob = torch.ones((), dtype=torch.float64)
            for t, bits in enumerate((bits0, bits1)):
                m = torch.ones(6, dtype=torch.float64)
                for n, b in zip(guests[t], bits):
                    m[n] = b
                    prob = prob * (phi[n, t] if b else 1 - phi[n, t])
                forced[t] = m
            with (
                torch.no_grad()
            ):  # a fixed baseline: b_t = baseline (weight 1 => no bias correction)
                mpps.baseline.fill_(baseline)
                mpps.baseline_weight.fill_(1.0)
            total += prob * estimate()
    assert torch.allclose(total, exact, atol=1e-5), (total, exact)


def test_reinforce_monte_carlo_and_baseline_variance() -> None:
    """With the real sampler: the sample mean is within 4.5 standard errors of the exact gradient,
    and the moving-average baseline lowers the estimator's variance on this problem."""
    k = 600
    variances = []
    for decay in (None, 0.9):
        _, exact, estimate = _reinforce_problem(decay)
        samples = torch.stack([estimate() for _ in range(k)])
        mean, se = samples.mean(0), samples.std(0) / k**0.5
        assert bool(((mean - exact).abs() <= 4.5 * se + 1e-4).all()), (decay, mean, exact, se)
        variances.append(float(samples.var(0).sum()))
    assert variances[1] < variances[0]


def test_gaussian_pathwise_gradient_is_unbiased() -> None:
    """L = (w . (z * m) - y)^2 has E over the Gaussian masks in closed form: mu^2 + sum_g (w z r)^2."""
    torch.manual_seed(1)
    layer = nn.Linear(3, 6)
    x = torch.randn(1, 3)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5, -1.0, 2.0])
    mpps = MPPS(nn.Sequential(layer), 2, scheduler=3, family="gaussian", beta=0.0, seed=3)
    with torch.no_grad():
        mpps.logits[0].copy_(
            logit(
                torch.tensor(
                    [[0.9, 0.3], [0.8, 0.6], [0.7, 0.45], [0.2, 0.85], [0.5, 0.75], [0.35, 0.95]]
                )
            )
        )
    z = layer(x).detach().double()[0]
    a = mpps.logits[0].detach().double().clone().requires_grad_(True)
    own = a.detach().argmax(1)
    exact = []
    for t in range(2):
        r = torch.exp(-a[:, t] / 2) * (own != t)
        mu = (w.double() * z).sum() - 0.25
        expected = mu**2 + ((w.double() * z * r) ** 2).sum()
        exact.append(torch.autograd.grad(expected, a)[0][:, t])
    exact_t = torch.stack(exact, 1)
    k = 800
    samples = torch.empty(k, 6, 2, dtype=torch.float64)
    for i in range(k):
        losses = mpps.losses(lambda t: ((layer(x) @ w - 0.25) ** 2).sum())
        (g,) = torch.autograd.grad(sum(losses), mpps.logits[0])
        samples[i] = g.double()
    mean, se = samples.mean(0), samples.std(0) / k**0.5
    assert bool(((mean - exact_t).abs() <= 4.5 * se + 1e-4).all()), (mean, exact_t, se)


def test_baseline_matches_hand_computed_ema() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(2, 4)
    mpps = MPPS(nn.Sequential(layer), 2, scheduler=3, baseline_decay=0.5, seed=2)
    x = torch.randn(3, 2)
    values: list[torch.Tensor] = []
    for step in range(4):
        raw = []
        for t in range(2):
            with mpps.task(t):
                raw.append(layer(x).pow(2).mean() * (t + 1))
        mpps.regularize(raw)
        b = mpps.diagnostics["baseline"]
        if not values:
            assert torch.equal(b, torch.zeros(2))
        else:
            ws = torch.tensor([0.5 ** (len(values) - 1 - j) for j in range(len(values))])
            ref = (ws[:, None] * torch.stack(values)).sum(0) / ws.sum()
            assert torch.allclose(b, ref, atol=1e-6)
        values.append(torch.stack([r.detach() for r in raw]))


# ---------------------------------------------------------------- schedule and target
def test_end_epoch_gives_target_ec_equal_to_schedule() -> None:
    net, heads, mpps = setup("bernoulli", scheduler=Linear(8, frozen=1))
    x, y = data()
    opt = torch.optim.SGD(mpps.parameters(), lr=0.5)
    assert all(
        torch.allclose(p, q, atol=1e-6) for p, q in zip(mpps.target, mpps.phi)
    )  # Pi starts = Phi
    for epoch in range(8):
        for _ in range(2):
            opt.zero_grad()
            sum(mpps.losses(task_loss(net, heads, x, y))).backward()
            opt.step()
        before = [p.clone() for p in mpps.target]
        value = mpps.end_epoch()
        assert value == mpps.scheduler(epoch + 1)
        if mpps.scheduler.course(epoch + 1) == mpps.scheduler.course(epoch):
            assert all(torch.equal(a, b) for a, b in zip(before, mpps.target))
            continue
        # per neuron: EC(Pi) = C_i wherever no guest entry was clipped
        for phi, pi in zip(mpps.phi, mpps.target):
            own = phi.argmax(1)
            guest = torch.ones_like(pi, dtype=torch.bool)
            guest[torch.arange(len(own)), own] = False
            c = neuron_ec(phi)
            raw = 1 - (value / c)[:, None] * (1 - phi)
            ok = ((raw >= mpps.eps) & (raw <= 1 - mpps.eps) | ~guest).all(1)
            assert torch.allclose(neuron_ec(pi)[ok], torch.full((int(ok.sum()),), value), atol=1e-5)
            if 0.05 < value < 0.95:
                assert bool(ok.any())
    assert mpps.epoch == 8


def test_fullshare_and_separ_targets() -> None:
    _, _, full = setup(scheduler=FullShare(4))
    assert all(torch.allclose(p, torch.full_like(p, 0.99)) for p in full.target)
    assert abs(full.ec("target").item() - 0.01) < 1e-6
    _, _, sep = setup(scheduler=Separ(4))
    before = [p.clone() for p in sep.target]
    for _ in range(4):
        sep.end_epoch()
    assert all(torch.equal(a, b) for a, b in zip(before, sep.target))


def test_stepn_updates_only_at_course_ends() -> None:
    _, _, mpps = setup(scheduler=StepN(9, n=3))
    changes = []
    for _ in range(8):
        before = [p.clone() for p in mpps.target]
        mpps.end_epoch()
        changes.append(not all(torch.equal(a, b) for a, b in zip(before, mpps.target)))
    assert changes == [False, False, True, False, False, True, False, False]


def test_non_adaptive_target_ignores_learnt_phi() -> None:
    _, _, a = setup(adaptive_target=False)
    with torch.no_grad():
        for p in a.logits:
            p.add_(torch.randn_like(p))
    a.end_epoch()
    init = [exclusive_phi(p.shape[0], 3, 0.01) for p in a.phi]
    from torch_mtlgrad.mpps.target import update_target

    ref = update_target(init, a.scheduler(1), 0.01)
    assert all(torch.allclose(x, y) for x, y in zip(a.target, ref))
    assert abs(distribution_ec(a.target).item() - a.scheduler(1)) < 1e-5


# ---------------------------------------------------------------- state
def _train(net, heads, mpps, opt, x, y, steps: int, batched: bool = False) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        opt.zero_grad()
        if batched:

            def all_losses():
                feats = net(mpps.repeat(x)).chunk(3)
                return [((heads[t](feats[t]) - y[t]) ** 2).mean() for t in range(3)]

            losses = mpps.losses_batched(all_losses)
        else:
            losses = mpps.losses(task_loss(net, heads, x, y))
        sum(losses).backward()
        opt.step()
        out.append(torch.stack([v.detach() for v in losses]))
    return out


def _make_opt(net, heads, mpps):
    return torch.optim.Adam(
        [
            {"params": [*net.parameters(), *heads.parameters()]},
            {"params": mpps.parameters(), "lr": 0.05},
        ],
        lr=0.01,
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batched", [False, True])
def test_state_dict_roundtrip_gives_identical_next_steps(family: str, batched: bool) -> None:
    x, y = data()
    net, heads, mpps = setup(family)
    opt = _make_opt(net, heads, mpps)
    _train(net, heads, mpps, opt, x, y, 3, batched)
    mpps.end_epoch()
    buf = io.BytesIO()
    torch.save(
        {
            "net": net.state_dict(),
            "heads": heads.state_dict(),
            "mpps": mpps.state_dict(),
            "opt": opt.state_dict(),
        },
        buf,
    )
    cont = _train(net, heads, mpps, opt, x, y, 3, batched)
    mpps.end_epoch()
    cont_phi = [p.clone() for p in mpps.phi]
    cont_target = [p.clone() for p in mpps.target]

    net2, heads2, mpps2 = setup(family, seed=99)  # different init, different RNG
    opt2 = _make_opt(net2, heads2, mpps2)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2.load_state_dict(ck["net"])
    heads2.load_state_dict(ck["heads"])
    mpps2.load_state_dict(ck["mpps"])
    opt2.load_state_dict(ck["opt"])
    assert mpps2.epoch == 1
    resumed = _train(net2, heads2, mpps2, opt2, x, y, 3, batched)
    mpps2.end_epoch()
    assert all(torch.equal(a, b) for a, b in zip(cont, resumed))
    assert all(torch.equal(a, b) for a, b in zip(cont_phi, mpps2.phi))
    assert all(torch.equal(a, b) for a, b in zip(cont_target, mpps2.target))


def test_load_state_dict_refuses_other_configuration() -> None:
    _, _, a = setup("bernoulli")
    _, _, b = setup("gaussian")
    with pytest.raises(ValueError, match="family"):
        b.load_state_dict(a.state_dict())


# ---------------------------------------------------------------- bad input
def test_bad_input() -> None:
    net, _, mpps = setup()
    with pytest.raises(ValueError, match="num_tasks"):
        MPPS(net, 1, scheduler=3)
    with pytest.raises(TypeError, match="scheduler"):
        MPPS(net, 2, scheduler="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="family"):
        MPPS(net, 2, scheduler=3, family="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        MPPS(net, 2, scheduler=3, beta=-1.0)
    with pytest.raises(ValueError, match="baseline_decay"):
        MPPS(net, 2, scheduler=3, baseline_decay=1.0)
    with pytest.raises(ValueError, match="task must be"), mpps.task(3):
        pass
    with pytest.raises(RuntimeError, match="nest"), mpps.task(0), mpps.task(1):
        pass
    with pytest.raises(RuntimeError, match="no mask drawn"):
        mpps.regularize([torch.tensor(1.0)] * 3)
    for t in range(3):
        with mpps.task(t):
            pass
    with pytest.raises(ValueError, match="3 task losses"):
        mpps.regularize([torch.tensor(1.0)] * 2)
    with pytest.raises(ValueError, match="task 1 must be a scalar"):
        mpps.regularize([torch.tensor(1.0), torch.ones(2), torch.tensor(1.0)])
    with pytest.raises(ValueError, match="task 2 is not finite"):
        mpps.regularize([torch.tensor(1.0), torch.tensor(1.0), torch.tensor(float("nan"))])
    with pytest.raises(ValueError, match="expected 8 neurons"), mpps.task(0):
        mpps._hook(0, mpps.layers[0], (), torch.randn(2, 3))  # a layer output of the wrong width


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    """phi stays float32 (float64 for float64 layers); masks are cast to the layer's output dtype."""
    net = mlp().to(dtype)
    mpps = MPPS(net, 2, scheduler=3, family="gaussian")
    assert all(
        a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for a in mpps.logits
    )
    x = torch.randn(4, 5, dtype=dtype)
    losses = mpps.losses(lambda t: net(x)[:, t].float().pow(2).mean())
    assert all(torch.isfinite(v) for v in losses)
    with mpps.task(0):
        assert net(x).dtype == dtype
    sum(losses).backward()
    assert all(a.grad is not None and a.grad.dtype == a.dtype for a in mpps.logits)
