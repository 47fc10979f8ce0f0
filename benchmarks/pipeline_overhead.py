"""Per-step cost of this checkout's MultiTaskOptimizer against another version of it, side by side
in one process: the steps alternate between the two on identical models and batches, and the
table gives each one's minimum over the steps (robust to a loaded machine) and whether the two
wrote the same ``.grad`` bits.  A small MLP encoder, so that any per-step work outside autograd
shows.

    git worktree add /tmp/old <commit>
    python benchmarks/pipeline_overhead.py --old /tmp/old/torch_mtlgrad

The other version is copied to a temporary directory as the package ``torch_mtlgrad_before``
(its absolute self-references renamed), so both import in one interpreter.
"""
import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--old", required=True, help="the other version's torch_mtlgrad package directory")
p.add_argument("--steps", type=int, default=60)
args = p.parse_args()
tmp = Path(tempfile.mkdtemp())
shutil.copytree(args.old, tmp / "torch_mtlgrad_before")
for f in (tmp / "torch_mtlgrad_before").rglob("*.py"):
    f.write_text(re.sub(r"torch_mtlgrad(?=[.:\"])", "torch_mtlgrad_before", f.read_text()))
sys.path.insert(0, str(tmp))
import torch_mtlgrad_before as old
from torch_mtlgrad_before.aggregators.mean import Mean as OldMean
from torch_mtlgrad_before.aggregators.mgda import MinNorm as OldMinNorm
from torch_mtlgrad_before.aggregators.upgrad import UPGrad as OldUPGrad

import torch_mtlgrad as new
from torch_mtlgrad.aggregators.mean import Mean
from torch_mtlgrad.aggregators.mgda import MinNorm
from torch_mtlgrad.aggregators.upgrad import UPGrad

torch.set_num_threads(1)

def model(T, width):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU())
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1) for _ in range(T)])
    return enc, heads

def run(T, width, cls_old, cls_new, capture, steps=args.steps):
    x = torch.randn(64, 32); ys = torch.randn(T, 64, 1)
    opts = []
    for pkg, agg in ((old, cls_old()), (new, cls_new())):
        enc, heads = model(T, width)
        opt = pkg.MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.0),
                                     shared=enc, aggregator=agg, capture=capture, diagnostics=False)
        opts.append((opt, enc, heads))
    times = [[], []]
    for s in range(steps):
        for k, (opt, enc, heads) in enumerate(opts):
            t0 = time.perf_counter()
            opt.zero_grad()
            z = enc(x)
            losses = [torch.nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]
            opt.backward(losses, features=z)
            opt.step()
            if s >= 5:
                times[k].append(time.perf_counter() - t0)
    a, b = opts[0][1], opts[1][1]
    same = all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    return min(times[0]) * 1e3, min(times[1]) * 1e3, same

print(f"| T | width | aggregator | capture | old ms (min of {args.steps - 5}) | new ms | new / old | same .grad bits |")
print("|---|---|---|---|---|---|---|---|")
for T, width in ((3, 64), (10, 64), (40, 64), (10, 512)):
    for name, co, cn in (("mean", OldMean, Mean), ("mgda", OldMinNorm, MinNorm), ("upgrad", OldUPGrad, UPGrad)):
        for capture in ("loop", "batched"):
            o, n, same = run(T, width, co, cn, capture)
            print(f"| {T} | {width} | {name} | {capture} | {o:.3f} | {n:.3f} | {n / o:.2f} | {same} |", flush=True)
