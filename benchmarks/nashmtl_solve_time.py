"""Nash-MTL solve time per step for T = 2, 10, 40 tasks.

Times ``NashMTL.aggregate_gramian(G)`` (the whole solve from the Gramian: the sequence of cvxpy
problems, the polish and the conversions; the Gramian itself is precomputed, so D does not
enter).  Three cases per T:

* cold: the first call of a fresh ``NashMTL`` (builds and canonicalises the cvxpy problem,
  starts the sequence at ``a = 1``); one fresh instance per repeat.
* warm, slowly varying J: one instance over a sequence ``J_k = J_{k-1} + noise`` (as in training;
  the sequence starts at the previous solution).
* warm, independent J: one instance, a fresh random J every step.

Reports the median wall time (and its 10th/90th percentiles) in milliseconds, the median
process CPU time (on a shared machine the better estimate of the uncontended wall time, the
solve being single-threaded) and the mean number of convex problems per solve.  Usage::

    python benchmarks/nashmtl_solve_time.py [--repeats 30] [--dim 1000] [--torchjd]

``--torchjd`` adds torchjd 0.18's NashMTL (ECOS, rebuilt problem per instance) for comparison,
when installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from torch_mtlgrad.aggregators.nashmtl import NashMTL


def make_J(rng: np.random.Generator, T: int, D: int) -> torch.Tensor:
    v = rng.standard_normal(D)
    v /= np.linalg.norm(v)
    return torch.tensor(rng.standard_normal((T, D)) / np.sqrt(D) + 0.3 * v)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


CPU: list[float] = []  # process CPU ms of every timed call, in order


def time_call(agg: NashMTL, J: torch.Tensor) -> float:
    G = J @ J.T
    c0, t0 = time.process_time(), time.perf_counter()
    agg.aggregate_gramian(G)
    t1, c1 = time.perf_counter(), time.process_time()
    CPU.append((c1 - c0) * 1e3)
    return (t1 - t0) * 1e3


def bench(T: int, D: int, repeats: int, rng: np.random.Generator) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    cold, cold_it = [], []
    CPU.clear()
    for _ in range(repeats):
        agg = NashMTL()
        cold.append(time_call(agg, make_J(rng, T, D)))
        cold_it.append(float(agg.diagnostics["iterations"]))
    out["cold"] = (cold, list(CPU), cold_it)
    agg = NashMTL()
    J = make_J(rng, T, D)
    time_call(agg, J)
    slow, slow_it = [], []
    CPU.clear()
    for _ in range(repeats):
        J = J + 0.05 * torch.tensor(rng.standard_normal((T, D)) / np.sqrt(D))
        slow.append(time_call(agg, J))
        slow_it.append(float(agg.diagnostics["iterations"]))
    out["warm, slowly varying J"] = (slow, list(CPU), slow_it)
    indep, indep_it = [], []
    CPU.clear()
    for _ in range(repeats):
        indep.append(time_call(agg, make_J(rng, T, D)))
        indep_it.append(float(agg.diagnostics["iterations"]))
    out["warm, independent J"] = (indep, list(CPU), indep_it)
    return out


def bench_torchjd(T: int, D: int, repeats: int,
                  rng: np.random.Generator) -> tuple[list[float], list[float]] | None:
    try:
        from torchjd.aggregation import NashMTL as TJNash
    except ImportError:
        return None
    agg = TJNash(n_tasks=T)
    times, cpu = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        J = make_J(rng, T, D)
        agg(J)
        for _ in range(repeats):
            J = J + 0.05 * torch.tensor(rng.standard_normal((T, D)) / np.sqrt(D))
            c0, t0 = time.process_time(), time.perf_counter()
            agg(J)
            t1, c1 = time.perf_counter(), time.process_time()
            times.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
    return times, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    ap.add_argument("--torchjd", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    import cvxpy

    print(f"# Nash-MTL solve time ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, cvxpy {cvxpy.__version__}, "
          f"solver CLARABEL, load avg {os.getloadavg()[0]:.1f})")
    print(f"# repeats={args.repeats}, D={args.dim}")
    print("| T | case | median wall ms | p10 | p90 | median CPU ms | convex problems / solve |")
    print("|---|------|----------------|-----|-----|---------------|-------------------------|")
    for T in args.tasks:
        for case, (times, cpu, its) in bench(T, args.dim, args.repeats, rng).items():
            print(f"| {T} | {case} | {statistics.median(times):.2f} | {pct(times, 10):.2f} | "
                  f"{pct(times, 90):.2f} | {statistics.median(cpu):.2f} | "
                  f"{statistics.mean(its):.2f} |")
        if args.torchjd:
            tj = bench_torchjd(T, args.dim, args.repeats, rng)
            if tj is not None:
                t, c = tj
                print(f"| {T} | torchjd 0.18 NashMTL (ECOS), warm, slowly varying J, whole call"
                      f" | {statistics.median(t):.2f} | {pct(t, 10):.2f} | {pct(t, 90):.2f} | "
                      f"{statistics.median(c):.2f} | - |")


if __name__ == "__main__":
    main()
