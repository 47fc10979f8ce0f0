"""MoCo against plain summing and MGDA on a 3-task MLP on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download): 1797 8x8
images, pixels scaled to [0, 1], a seeded stratified 75/25 train/test split.  Three tasks on the
same images: (1) the digit (10 classes), (2) even / odd, (3) digit >= 5.  Model: a shared encoder
``64 -> 64 -> 64`` (ReLU) and one linear head per task; cross-entropy per task.  Each step the
task Jacobian of the shared encoder's parameters (3 backward passes) goes to the aggregator, whose
direction becomes the encoder's gradient; the heads get the gradient of the plain sum of the
losses (each head only sees its own loss).  SGD with momentum 0.9, mini-batches of 32.

Methods (``--methods``): ``sum``, ``mgda``, ``moco`` (``MoCo()``, the defaults after the fix: a
constant tracking step ``beta = 0.9``), ``moco-old`` (the former defaults, LibMTL's schedule
``beta_k = 0.5 / sqrt(k)``) and ``moco-libmtl`` (that schedule with LibMTL's normalisation of
each gradient to its loss).

    python benchmarks/moco_digits.py                       # the table (3 seeds)
    python benchmarks/moco_digits.py --epochs 1 --seeds 0 --max-steps 20   # a smoke run
    python benchmarks/moco_digits.py --append-results      # also append to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torch_mtlgrad.aggregators import get
from torch_mtlgrad.aggregators.moco import MoCo

TASKS = ("digit", "parity", "ge5")

# name -> factory of the aggregator (None: plain sum of the rows).
METHODS: dict[str, Any] = {
    "sum": lambda: None,
    "mgda": lambda: get("mgda"),
    "moco": lambda: MoCo(),
    "moco-old": lambda: MoCo(beta=0.5, beta_sigma=0.5),
    "moco-libmtl": lambda: MoCo(beta=0.5, beta_sigma=0.5, normalize="loss"),
}


def load(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    def targets(d):
        d = torch.as_tensor(d)
        return torch.stack([d, d % 2, (d >= 5).long()], dim=1)
    return (torch.tensor(Xtr, dtype=torch.float32), targets(ytr),
            torch.tensor(Xte, dtype=torch.float32), targets(yte))


class Net(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(hidden, 10), nn.Linear(hidden, 2),
                                    nn.Linear(hidden, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]


def train(method: str, seed: int, epochs: int, lr: float, batch: int,
          max_steps: int | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    Xtr, Ytr, Xte, Yte = load(seed)
    net = Net()
    agg = METHODS[method]()
    shared = list(net.encoder.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(Xtr.shape[0], generator=gen)
        for i in range(0, Xtr.shape[0], batch):
            idx = perm[i:i + batch]
            outs = net(Xtr[idx])
            losses = torch.stack([loss_fn(o, Ytr[idx, t]) for t, o in enumerate(outs)])
            opt.zero_grad(set_to_none=True)
            rows = []
            for t in range(len(TASKS)):
                g = torch.autograd.grad(losses[t], shared, retain_graph=True)
                rows.append(torch.cat([x.reshape(-1) for x in g]))
            J = torch.stack(rows)
            d = J.sum(0) if agg is None else agg(J, losses.detach())
            heads = [p for h in net.heads for p in h.parameters()]
            hg = torch.autograd.grad(losses.sum(), heads)
            for p, g in zip(heads, hg):
                p.grad = g
            off = 0
            for p in shared:
                p.grad = d[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    with torch.no_grad():
        outs = net(Xte)
        acc = [float((o.argmax(1) == Yte[:, t]).float().mean()) for t, o in enumerate(outs)]
    return {"method": method, "seed": seed, "acc": acc, "steps": steps,
            "seconds": time.perf_counter() - t0}


def table(results: list[dict[str, Any]], methods: list[str], seeds: list[int]) -> str:
    lines = ["| method | " + " | ".join(f"test acc. {t}" for t in TASKS) + " | mean |",
             "|---|" + "---|" * (len(TASKS) + 1)]
    for m in methods:
        accs = np.array([r["acc"] for r in results if r["method"] == m])
        mean, std = accs.mean(0), accs.std(0)
        cells = [f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(mean, std)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {accs.mean():.3f} |")
    lines.append(f"\n(mean ± standard deviation over seeds {seeds})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="sum,mgda,moco,moco-old,moco-libmtl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=None, help="stop each run early (smoke)")
    ap.add_argument("--json", default=None, help="write the per-run results here")
    ap.add_argument("--append-results", action="store_true",
                    help="append the table as a section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [train(m, s, args.epochs, args.lr, args.batch, args.max_steps)
               for m in methods for s in seeds]
    out = table(results, methods, seeds)
    print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.append_results:
        append_results(out, argv if argv is not None else sys.argv[1:], results)
    return out


def append_results(out: str, argv: list[str], results: list[dict[str, Any]]) -> None:
    root = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                          cwd=root).stdout.strip()
    secs = sum(r["seconds"] for r in results)
    section = (
        "\n## MoCo on a 3-task digits MLP (sum, MGDA, MoCo before and after the defaults fix)\n\n"
        "```\n"
        f"python benchmarks/moco_digits.py {' '.join(argv)}\n"
        "```\n\n"
        f"- Machine: {platform.machine()} CPU ({torch.get_num_threads()} torch thread), "
        f"{platform.system()}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"training time of all runs {secs:.0f} s.\n"
        f"- Code version: `{head}` (git rev-parse HEAD; the script and MoCo as committed "
        "there, plus any uncommitted edits of the run).\n"
        "- Setup: scikit-learn's bundled digits, 75/25 stratified split per seed; shared MLP "
        "64-64-64 (ReLU) and a linear head per task (digit, even/odd, digit >= 5); the "
        "aggregator's direction on the encoder, the summed losses' gradient on the heads; SGD "
        "(momentum 0.9, lr 0.05, batch 32).  `moco` = `MoCo()` (defaults after the fix: "
        "constant tracking step `beta=0.9, beta_sigma=0`); `moco-old` = "
        "`MoCo(beta=0.5, beta_sigma=0.5)` (the former defaults, LibMTL's schedule); "
        "`moco-libmtl` = that schedule with `normalize=\"loss\"` (LibMTL's gradient "
        "normalisation).\n\n"
        f"{out}\n")
    path = root / "RESULTS.md"
    text = path.read_text()  # re-read right before appending
    if not text.endswith("\n"):
        section = "\n" + section
    with path.open("a") as f:
        f.write(section)


if __name__ == "__main__":
    main()
