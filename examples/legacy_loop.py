"""A training loop that calls ``backward()`` once per task, converted with ``opt.task(t)``.

Many multi-task loops already run one backward per task (to log per-task gradient norms, or
because each task's batch comes from its own loader)::

    # before: plain PyTorch, the shared encoder gets the sum of the task gradients
    opt.zero_grad()
    for t, loss_t in enumerate(losses):
        loss_t.backward(retain_graph=t < T - 1)
    opt.step()

The conversion keeps the loop and adds one line around each backward::

    # after
    opt = MultiTaskOptimizer(base, shared=model.encoder, aggregator="sum", num_tasks=T)
    opt.zero_grad()
    for t, loss_t in enumerate(losses):
        with opt.task(t, loss=loss_t):              # loss= for methods that read the losses
            loss_t.backward(retain_graph=t < T - 1)
    opt.step()

Inside ``opt.task(t)`` hooks on the shared parameters route the backward into row ``t`` of the
task Jacobian; the task-specific parameters (the heads) accumulate their gradients as before.
``num_tasks=T`` lets the direction be written when the last block ends, so anything between the
loop and ``opt.step()`` (``clip_grad_norm_``) sees it.

The script checks that the converted loop with ``"sum"`` takes the same first step as the
original one (the largest parameter difference is printed), then trains both the plain loop and
the converted loop with a conflict-aware method (``--aggregator``, default ``"cagrad"``:
conflict-averse gradient descent, Liu et al., NeurIPS 2021) and prints both tasks' test losses.

Run:  python examples/legacy_loop.py [--epochs 20] [--aggregator cagrad]
"""

from __future__ import annotations

import argparse

import torch
from _common import positive_float, positive_int, table  # examples/_common.py
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer, aggregators


def make_data(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two regression tasks; the second one's targets are 10x larger and conflict with the first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y1 = torch.tanh(x[:, :4].sum(1, keepdim=True))
    y2 = -10.0 * torch.tanh(x[:, 2:6].sum(1, keepdim=True))
    return x, [y1, y2]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]


def step_before(model: Net, opt: torch.optim.Optimizer, x: torch.Tensor,
                ys: list[torch.Tensor]) -> None:
    """The original loop body: one backward per task, the encoder gets the sum."""
    opt.zero_grad()
    losses = [nn.functional.mse_loss(o, y) for o, y in zip(model(x), ys)]
    for t, loss_t in enumerate(losses):
        loss_t.backward(retain_graph=t < len(losses) - 1)
    opt.step()


def step_after(model: Net, opt: MultiTaskOptimizer, x: torch.Tensor,
               ys: list[torch.Tensor]) -> None:
    """The converted loop body: the same loop, each backward inside ``opt.task(t)``."""
    opt.zero_grad()
    losses = [nn.functional.mse_loss(o, y) for o, y in zip(model(x), ys)]
    for t, loss_t in enumerate(losses):
        with opt.task(t, loss=loss_t):
            loss_t.backward(retain_graph=t < len(losses) - 1)
    opt.step()


def build(aggregator: str | None, lr: float) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initialisation for every run
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if aggregator is None:
        return model, base
    return model, MultiTaskOptimizer(base, shared=model.encoder, aggregator=aggregator,
                                     num_tasks=2)


def first_step_difference(lr: float) -> float:
    """The largest parameter difference after one step of the two loops with ``"sum"``."""
    x, ys = make_data(64, seed=1)
    m0, o0 = build(None, lr)
    m1, o1 = build("sum", lr)
    step_before(m0, o0, x, ys)
    step_after(m1, o1, x, ys)  # type: ignore[arg-type]
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(m0.parameters(), m1.parameters()))


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, ys: list[torch.Tensor]) -> list[float]:
    """Test MSE of each task divided by its target variance (1.0 = predicting the mean)."""
    return [float(nn.functional.mse_loss(o, y) / y.var()) for o, y in zip(model(x), ys)]


def train(aggregator: str | None, epochs: int, lr: float) -> list[float]:
    model, opt = build(aggregator, lr)
    x, ys = make_data(1024, seed=2)
    for epoch in range(epochs):
        perm = torch.randperm(1024, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 1024, 64):
            idx = perm[i:i + 64]
            batch = [y[idx] for y in ys]
            if aggregator is None:
                step_before(model, opt, x[idx], batch)
            else:
                step_after(model, opt, x[idx], batch)  # type: ignore[arg-type]
    xt, yts = make_data(2048, seed=3)
    return evaluate(model, xt, yts)


def aggregator_name(text: str) -> str:
    try:
        aggregators.get(text)
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--lr", type=positive_float, default=0.01)
    parser.add_argument("--aggregator", type=aggregator_name, default="cagrad",
                        help="the method of the converted loop (default cagrad)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: this network is too small to gain)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    diff = first_step_difference(args.lr)
    print(f"first step, plain per-task backward vs opt.task(t) with 'sum': largest parameter "
          f"difference {diff:.3g} ({'the same step' if diff <= 1e-6 else 'DIFFERENT'})")
    results = {"per-task backward (sum)": train(None, args.epochs, args.lr),
               f"opt.task(t), {args.aggregator}": train(args.aggregator, args.epochs, args.lr)}
    print(f"\ntest loss relative to each task's variance after {args.epochs} epochs "
          "(lower is better):")
    print(table(["loop", "task 1", "task 2 (10x)", "mean"],
                [[k, a, b, (a + b) / 2] for k, (a, b) in results.items()]))
    (a0, b0), (a1, b1) = results.values()
    m0, m1 = (a0 + b0) / 2, (a1 + b1) / 2
    print(f"\nResult: the converted loop with {args.aggregator} reached a mean relative test loss "
          f"of {m1:.4f} against {m0:.4f} for the plain loop "
          f"({'lower' if m1 < m0 else 'not lower'}; task 1 {a1:.4f} vs {a0:.4f}, "
          f"task 2 {b1:.4f} vs {b0:.4f}).")


if __name__ == "__main__":
    main()
