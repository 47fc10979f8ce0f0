"""Quickstart: the two-line change on a small synthetic two-task problem (CPU, a few seconds).

Two regression tasks share an encoder; the second task's targets are 10x larger, so its gradients
dominate a plain sum.  We train the same network twice from the same initialisation:

* plain summing: ``sum(losses).backward()``;
* ``MultiTaskOptimizer(..., aggregator="central+tension")``: the central direction of the
  tensioner paper (eq. 3-4) corrected by task tensioners (eq. 5-8).

and print both tasks' test losses (relative to their variance, so they are comparable), then one
sentence, computed from those numbers, saying which training did better on which task.

Run:  python examples/quickstart.py            (about 5 s on one CPU core; ``--epochs`` to change)

The script uses one torch thread (``--threads``): every operation of this small network is too
small to split, so more threads only wait for each other; on a 2-core machine shared with one
busy process torch's default two threads made the same run about 5x slower (36 s against 8 s).
A model this small is best trained on one thread; a larger one is not (keep torch's default
there).
"""

from __future__ import annotations

import argparse

import torch
from _common import positive_int  # examples/_common.py: validated argparse numbers
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


def conclusion(results: dict[str, list[float]]) -> str:
    """One sentence saying what the final numbers show (computed from them)."""
    (base, b), (other, o) = results.items()
    names = ["task 1", "task 2 (10x larger targets)"]
    better = [n for n, x, y in zip(names, b, o) if y < x]
    worse = [n for n, x, y in zip(names, b, o) if y > x]
    mb, mo = sum(b) / len(b), sum(o) / len(o)
    if len(better) == len(names):
        what = f"{other} beat {base} on both tasks"
    elif not better:
        what = f"{other} did not beat {base} on any task"
    else:
        what = (f"{other} beat {base} on {' and '.join(better)} and lost on "
                f"{' and '.join(worse) or 'neither'}")
    verdict = "lower" if mo < mb else "higher" if mo > mb else "the same"
    return (f"Result: {what}; its mean relative test loss is {verdict} "
            f"({mo:.4f} against {mb:.4f}, {abs(mo - mb) / mb:.0%} "
            f"{'less' if mo < mb else 'more'}) on one seed of this synthetic problem.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=30, help="epochs (default 30)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: this network is too small to gain "
                             "from more; see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for method in ["sum", "central+tension"]:
        print(f"training with {method}")
        results[method] = train(method, args.epochs)
    print("\nfinal test loss relative to each task's variance (lower is better):")
    print(f"  {'method':>15}  {'task 1':>8}  {'task 2 (10x)':>12}  {'mean':>8}")
    for method, (a, b) in results.items():
        print(f"  {method:>15}  {a:8.4f}  {b:12.4f}  {(a + b) / 2:8.4f}")
    print("\n" + conclusion(results))


if __name__ == "__main__":
    main()
