"""NORMAL: one integration pass for all task positions vs one pass per task, and eq. (7)'s accuracy.

Part 1 times forward + backward of :class:`TimeAwareODE` (FC, ``features`` wide, batch ``B``) with
positions spread evenly over ``[pmin, pmax]``, read off one shared pass (``shared_pass=True``) or
integrated task by task (``shared_pass=False``), for T = 3, 10, 40.  Both give the same numbers
(checked here).

Part 2 prints how p.grad (eq. 7) approaches a central finite difference of the loss in p as the
Euler step size halves (float64; p on the grid).

Run:  python benchmarks/normal_integration.py [--features 256] [--batch 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from torch_mtlgrad.normal import TimeAwareODE
from torch_mtlgrad.normal.integrate import grid_split


def time_block(T: int, shared_pass: bool, args: argparse.Namespace) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    pos = torch.linspace(args.pmin, args.pmax, T).tolist()
    block = TimeAwareODE(args.features, T, positions_init=pos, step_size=args.step_size)
    z0 = torch.randn(args.batch, args.features)
    w = torch.randn(T, args.batch, args.features)

    def once() -> list[torch.Tensor]:
        block.zero_grad()
        feats = block(z0, shared_pass=shared_pass)
        sum((f * w[t]).sum() for t, f in enumerate(feats)).backward()
        return [f.detach() for f in feats]

    out = once()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def euler_steps(T: int, shared_pass: bool, args: argparse.Namespace) -> int:
    """Euler steps (grid steps + one branch step per off-grid position) of one forward."""
    pos = torch.linspace(args.pmin, args.pmax, T).tolist()
    splits = [(p >= 0, *grid_split(p, args.step_size)) for p in pos]
    branch = sum(1 for _, _, r in splits if r > 0.0)
    if shared_pass:
        return (max((k for s, k, _ in splits if s), default=0)
                + max((k for s, k, _ in splits if not s), default=0) + branch)
    return sum(k for _, k, _ in splits) + branch


def convergence() -> None:
    torch.manual_seed(3)
    n, p, eps = 5, 0.75, 1e-6
    print("\n| step size | Euler steps to p | p.grad (eq. 7) | central FD of the loss | abs. error |")
    print("|---|---|---|---|---|")
    for h in [0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125]:
        torch.manual_seed(3)
        block = TimeAwareODE(n, 1, step_size=h, omega_init=0.3, positions_init=p).double()
        head = torch.nn.Linear(n, 2).double()
        z0 = torch.randn(4, n, dtype=torch.float64)
        y = torch.randn(4, 2, dtype=torch.float64)

        def loss(pp: float) -> torch.Tensor:
            with torch.no_grad():
                block.positions.fill_(pp)
            return torch.nn.functional.mse_loss(head(block(z0)[0]), y)

        with torch.no_grad():
            fd = ((loss(p + eps) - loss(p - eps)) / (2 * eps)).item()
        block.zero_grad()
        loss(p).backward()
        g = block.positions.grad[0].item()
        print(f"| {h:g} | {round(p / h)} | {g:.6f} | {fd:.6f} | {abs(g - fd):.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--step-size", type=float, default=0.1)
    ap.add_argument("--pmin", type=float, default=-0.5)
    ap.add_argument("--pmax", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"features={args.features} batch={args.batch} step_size={args.step_size} "
          f"positions evenly in [{args.pmin}, {args.pmax}] threads={args.threads} "
          f"torch={torch.__version__}; forward+backward, median of {args.repeats}")
    print("\n| T | Euler steps one pass | Euler steps per task | one pass (ms) | per task (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for T in (3, 10, 40):
        t_one, out_one = time_block(T, True, args)
        t_per, out_per = time_block(T, False, args)
        assert all(torch.equal(a, b) for a, b in zip(out_one, out_per)), "read-outs differ"
        print(f"| {T} | {euler_steps(T, True, args)} | {euler_steps(T, False, args)} | "
              f"{1e3 * t_one:.1f} | {1e3 * t_per:.1f} | {t_per / t_one:.1f}x |")
    convergence()


if __name__ == "__main__":
    main()
