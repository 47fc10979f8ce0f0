"""Quickstart: the two-line change on a small synthetic two-task problem (CPU, well under a minute).

Two regression tasks share an encoder; the second task's targets are 10x larger, so its gradients
dominate a plain sum.  We train the same network twice from the same initialisation:

* plain summing: ``sum(losses).backward()``;
* ``MultiTaskOptimizer(..., aggregator="central+tension")``: the central direction of the
  tensioner paper (eq. 3-4) corrected by task tensioners (eq. 5-8).

and print both tasks' test losses (relative to their variance, so they are comparable).

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer


def make_data(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=g) * 4 - 2
    y1 = torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:2])             # task 1: unit scale
    y2 = 10.0 * (x[:, 2:3] ** 2 - x[:, 3:4] * x[:, 0:1]) / 3         # task 2: 10x larger
    return x, [y1, y2]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]


def train(method: str, epochs: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = Net()
    x, ys = make_data(1024, seed=1)
    xt, yts = make_data(1024, seed=2)
    base = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    opt = base if method == "sum" else MultiTaskOptimizer(base, shared=model.encoder,
                                                            aggregator=method)   # change 1 of 2
    crit = nn.MSELoss()
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for i in range(0, x.shape[0], 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            losses = [crit(out, y[idx]) for out, y in zip(model(x[idx]), ys)]
            if method == "sum":
                sum(losses).backward()
            else:
                opt.backward(losses)                                           # change 2 of 2
            opt.step()
        if epoch % max(1, epochs // 5) == 0 or epoch == epochs - 1:
            print(f"  [{method:>15}] epoch {epoch:3d}  " + "  ".join(
                f"task{t + 1} rel. loss {v:.4f}" for t, v in enumerate(evaluate(model, xt, yts))))
    return evaluate(model, xt, yts)


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, ys: list[torch.Tensor]) -> list[float]:
    """Test MSE of each task divided by its target variance (1.0 = predicting the mean)."""
    return [float(nn.functional.mse_loss(o, y) / y.var()) for o, y in zip(model(x), ys)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    results = {}
    for method in ["sum", "central+tension"]:
        print(f"training with {method}")
        results[method] = train(method, args.epochs)
    print("\nfinal test loss relative to each task's variance (lower is better):")
    print(f"  {'method':>15}  {'task 1':>8}  {'task 2 (10x)':>12}  {'mean':>8}")
    for method, (a, b) in results.items():
        print(f"  {method:>15}  {a:8.4f}  {b:12.4f}  {(a + b) / 2:8.4f}")


if __name__ == "__main__":
    main()
