"""Rerun of the tensioner paper's XOR/AND ablation (section 4.2, Tables 1 and 2).

The experiment: a shared ``Linear(2, 2)`` + sigmoid, one ``Linear(2, 1)`` head per task, MSE,
SGD with momentum 0.9, the four inputs of the truth table shuffled into two mini-batches of two
per epoch, the XOR targets multiplied by ``c`` (``c = 1``: Table 1, ``c = 10``: Table 2), at most
3000 epochs, 50 seeds, learning rates {5e-5, 1e-4, 5e-3, 1e-3, 5e-2, 1e-2}.

The authors' protocol (their public code, tiemink/MTL_TaskTensioner):

* initial weights fixed: ``torch.manual_seed(136)``, then the shared layer, then the heads of the
  tasks present in the order AND, XOR (their ``model_selector``: in a single-XOR run the XOR head
  therefore takes the draw the AND head takes in a two-task run); the per-run seed only orders
  the mini-batches (here ``numpy.random.RandomState(seed).shuffle`` once per epoch);
* the tasks are ordered ``("xor", "and")`` as in their ``logic.json``: that is the order in which
  the ``"segment"`` feasibility fix visits them;
* a task has converged in the first epoch where the sum of its two mini-batch training losses,
  divided by 4 x (number of tasks) (their sample counter: 8 for the two-task runs, 4 for the
  single-task ones), is under 1e-3; a run ends when every task has converged.  The tables
  report epochs as the paper counts them: the 0-based index of the epoch the run ended in (what
  the authors' script prints; one less than the number of epochs trained).  Internally
  ``conv`` is 1-based, 0 meaning "not converged".

The "harder" protocol varies the initialisation with the seed too (``torch.manual_seed(seed)``)
and takes the best learning rate of the grid per seed.

Methods: the single-task baselines; uniform weighting as the mean of the task gradients
(``"mean"``, ``k_m = 1/2``: the reading that reproduces the paper's Table 1 row) and as their sum
(``"sum"``, ``sum(losses).backward()``); min-norm (``"mgda"``, exact); central (``"central"``);
both with task tensioners (alpha 0.3, window 10, ``feasibility="segment"``, the authors' fix).
Beside the exact min-norm, ``"mgda-sener"`` emulates the two-task solver the authors' code
ships (Sener and Koltun's, which returns a vertex solution as 0.999 / 0.001): a user-defined
aggregator built on the library's ``WeightedAggregator``, not a library method, kept because
with it the paper's min-norm rows reproduce and with the exact solution they do not.

Speed: all runs of one method (seeds x learning rates x c x protocols) are trained at once with
batched tensors; the T = 2 direction math is batched over runs, calling the library where its
functions take batched input (the two-task min-norm closed form, the tension factors of eq. 7,
the dual-cone projection).  ``--check`` proves the batched training equal to the library: it
trains a subset of the same runs one by one with :class:`torch_mtlgrad.MultiTaskOptimizer` and
the library's aggregators and compares every parameter and every epoch loss.

Usage::

    python benchmarks/tensioner_logic_gates.py                 # the full run (tables on stdout)
    python benchmarks/tensioner_logic_gates.py --check         # batched == library, small subset
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import Aggregator, Tensioned, WeightedAggregator, get
from torch_mtlgrad.aggregators._solvers import _min_norm_two, dual_cone_weights
from torch_mtlgrad.aggregators.tension import tension_factors

# --------------------------------------------------------------------------------------------
# The experiment's constants

INPUTS = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))
TRUTH = {"xor": (0.0, 1.0, 1.0, 0.0), "and": (0.0, 0.0, 0.0, 1.0)}
HEAD_CREATION = ("and", "xor")  # the authors' model_selector creates the heads in this order
LRS = (5e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2)  # the paper's grid {5e-5, 1e-4, 5e-3, 1e-3, 5e-2, 1e-2}, sorted
SCALES = (1.0, 10.0)
PROTOCOLS = ("paper", "varied")
PAPER_INIT_SEED = 136
MOMENTUM = 0.9
BATCH = 2
THRESHOLD = 1e-3
ALPHA = 0.3
WINDOW = 10


@dataclass(frozen=True)
class Method:
    """A row of the tables: the tasks (in loss order), the base direction, tensioned or not."""

    tasks: tuple[str, ...]
    base: str  # "mean", "sum", "mgda", "mgda-sener" or "central"
    tension: bool
    label: str
    paper: str  # the paper's row it is compared with


TWO = ("xor", "and")
METHODS: dict[str, Method] = {
    "single-and": Method(("and",), "mean", False, "Single-task AND", "single-and"),
    "single-xor": Method(("xor",), "mean", False, "Single-task XOR", "single-xor"),
    "mean": Method(TWO, "mean", False, "Uniform weighting (mean)", "uniform"),
    "sum": Method(TWO, "sum", False, "Uniform weighting (sum)", "uniform"),
    "mgda": Method(TWO, "mgda", False, "Min-norm (exact)", "mgda"),
    "mgda-sener": Method(TWO, "mgda-sener", False, "Min-norm (Sener's solver)", "mgda"),
    "central": Method(TWO, "central", False, "Central dir.", "central"),
    "mgda+tension": Method(TWO, "mgda", True, "Min-norm (exact) + tensioner", "mgda+tension"),
    "mgda-sener+tension": Method(TWO, "mgda-sener", True, "Min-norm (Sener's solver) + tensioner",
                                 "mgda+tension"),
    "central+tension": Method(TWO, "central", True, "Central dir. + tensioner", "central+tension"),
}
# The paper's Tables 1 (c = 1) and 2 (c = 10): (convergence rate %, epochs mean, epochs std).
PAPER: dict[float, dict[str, tuple[float, float, float]]] = {
    1.0: {
        "single-and": (100.0, 351.70, 2.62),
        "single-xor": (100.0, 871.20, 52.95),
        "uniform": (100.0, 484.86, 18.12),
        "mgda": (100.0, 758.56, 137.15),
        "central": (100.0, 574.44, 43.37),
        "mgda+tension": (100.0, 493.16, 27.94),
        "central+tension": (100.0, 443.02, 21.14),
    },
    10.0: {
        "single-and": (100.0, 351.70, 2.62),
        "single-xor": (100.0, 2979.00, 0.80),
        "uniform": (46.0, 1831.60, 810.81),
        "mgda": (100.0, 1998.44, 316.38),
        "central": (100.0, 328.50, 25.45),
        "mgda+tension": (100.0, 210.38, 14.96),
        "central+tension": (100.0, 188.20, 24.29),
    },
}


@dataclass(frozen=True)
class Run:
    """One training run: protocol ("paper": fixed init, "varied": init from the seed), c, seed, lr."""

    protocol: str
    c: float
    seed: int
    lr: float

    @property
    def init_seed(self) -> int:
        return PAPER_INIT_SEED if self.protocol == "paper" else self.seed


def sener_weights(G: Tensor) -> Tensor:
    """``[R, 2]`` two-task min-norm weights as Sener and Koltun's published solver returns them.

    Their ``_min_norm_element_from2`` (MultiObjectiveOptimization, which the tensioner authors'
    code ships) gives the exact interior solution but returns a vertex solution as 0.999 / 0.001
    instead of 1 / 0: when ``g1 . g2 >= ||g1||^2`` the weight of ``g1`` is 0.999, when
    ``g1 . g2 >= ||g2||^2`` it is 0.001.  Not a library method: it is here to show what that
    clip does to the paper's min-norm rows (exact min-norm is :class:`MinNorm`).
    """
    g11, g12, g22 = G[:, 0, 0], G[:, 0, 1], G[:, 1, 1]
    w1 = (g22 - g12) / (g11 + g22 - 2 * g12)
    w1 = torch.where(g12 >= g11, torch.full_like(w1, 0.999),
                     torch.where(g12 >= g22, torch.full_like(w1, 0.001), w1))
    return torch.stack([w1, 1 - w1], -1)


class SenerMinNorm(WeightedAggregator):
    """:func:`sener_weights` as a library aggregator (a user-defined ``WeightedAggregator``).

    Example:
        >>> SenerMinNorm()(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))   # exact min-norm: g1
        tensor([1.0010, 0.0000])
    """

    gramian_only = True

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        assert G is not None
        if G.shape[0] != 2:
            raise ValueError(f"SenerMinNorm is the two-task solver, got {G.shape[0]} tasks")
        return sener_weights(G[None])[0]


def make_aggregator(method: str) -> Aggregator:
    """The library aggregator of a method (tensioners with the authors' ``"segment"`` fix)."""
    m = METHODS[method]
    if m.base == "mgda-sener":
        base: Aggregator = SenerMinNorm()
        return Tensioned(base, alpha=ALPHA, window=WINDOW, feasibility="segment") if m.tension else base
    if m.tension:
        return get(f"{m.base}+tension", alpha=ALPHA, window=WINDOW, feasibility="segment")
    return get(m.base)


def init_model(init_seed: int, tasks: Sequence[str], dtype: torch.dtype) -> tuple[nn.Linear, dict[str, nn.Linear]]:
    """The authors' initialisation: seed, shared ``Linear(2, 2)``, then heads in AND, XOR order."""
    torch.manual_seed(init_seed)
    enc = nn.Linear(2, 2)
    heads = {name: nn.Linear(2, 1) for name in HEAD_CREATION if name in tasks}
    enc.to(dtype)
    for h in heads.values():
        h.to(dtype)
    return enc, heads


_ORDER_CACHE: dict[tuple[int, int], np.ndarray] = {}


def batch_orders(seed: int, epochs: int) -> np.ndarray:
    """``[epochs, 4]`` sample orders: the four inputs shuffled once per epoch, seeded per run."""
    key = (seed, epochs)
    if key not in _ORDER_CACHE:
        rs = np.random.RandomState(seed)
        seq = np.arange(4)
        out = np.empty((epochs, 4), dtype=np.int64)
        for e in range(epochs):
            rs.shuffle(seq)
            out[e] = seq
        _ORDER_CACHE[key] = out
    return _ORDER_CACHE[key]


def targets(tasks: Sequence[str], c: float, dtype: torch.dtype) -> Tensor:
    """``[T, 4]`` targets, XOR multiplied by ``c``."""
    return torch.tensor([[v * (c if t == "xor" else 1.0) for v in TRUTH[t]] for t in tasks], dtype=dtype)


# --------------------------------------------------------------------------------------------
# Batched direction math (T tasks, R runs); checked against the library by --check and the tests


def batched_base_weights(base: str, G: Tensor) -> Tensor:
    """``[R, T]`` weights of the base direction for each run's Gramian ``G`` (``[R, T, T]``).

    ``"sum"``/``"mean"``: equal weights; ``"mgda"``: the library's two-task closed form, applied
    elementwise over runs; ``"central"``: the two-task bisector (eq. 3-4),
    ``c_m = (1/||g_m||) / sum_k (1/||g_k||)``, with the library's guard for zero rows.
    """
    R, T, _ = G.shape
    if base == "sum":
        return G.new_ones(R, T)
    if base == "mean" or T == 1:
        return G.new_full((R, T), 1.0 / T)
    if T != 2:
        raise ValueError(f"the batched {base!r} weights are written for T = 2 tasks, got T = {T}")
    if base == "mgda":
        return _min_norm_two(G.permute(1, 2, 0)).T
    if base == "mgda-sener":
        return sener_weights(G)
    if base == "central":
        tiny = torch.finfo(G.dtype).tiny
        norms = torch.diagonal(G, dim1=1, dim2=2).clamp_min(0).sqrt()
        nz = norms > tiny * 1e3
        safe = torch.where(nz, norms, torch.ones_like(norms))
        inv = torch.where(nz, 1.0 / safe, torch.zeros_like(norms))
        total = inv.sum(-1, keepdim=True)
        return torch.where(total > 0, inv / total.clamp_min(tiny), torch.full_like(inv, 1.0 / T))
    raise ValueError(f"unknown base direction {base!r}")


class BatchedTension:
    """Task tensioners (paper eq. 5-8, ``feasibility="segment"``) over R runs.

    Keeps, per run, the window of gradient norms; mirrors
    :class:`torch_mtlgrad.aggregators.Tensioned` step for step (row-space bookkeeping
    ``d = beta v + omega^T J``, the segment pass in task order, the projection fallback through
    the library's :func:`dual_cone_weights` when a constraint still fails).
    """

    def __init__(self, runs: int, tasks: int, dtype: torch.dtype, alpha: float = ALPHA,
                 window: int = WINDOW) -> None:
        self.alpha = alpha
        self.window = window
        self.history = torch.zeros(runs, window + 1, tasks, dtype=dtype)
        self.count = 0

    def __call__(self, J: Tensor, G: Tensor, v: Tensor, losses: Tensor,
                 active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the direction ``[R, D]``, and per run whether a segment fix fired and whether
        the projection fallback ran."""
        R, T, _ = J.shape
        eps = torch.finfo(J.dtype).eps
        tiny = torch.finfo(J.dtype).tiny
        diag = torch.diagonal(G, dim1=1, dim2=2)
        norms = diag.clamp_min(0).sqrt()
        self.history = torch.roll(self.history, -1, dims=1)
        self.history[:, -1] = norms
        self.count += 1
        no = torch.zeros(R, dtype=torch.bool)
        if self.alpha == 0.0 or self.count <= self.window:
            return v, no, no
        zeta_t = self.history[:, 1:].mean(1)
        zeta_prev = self.history[:, :-1].mean(1)
        ratio = torch.where(zeta_prev > 0, zeta_t / zeta_prev.clamp_min(tiny), torch.ones_like(zeta_t))
        delta = ratio + torch.log10(losses)
        c = tension_factors(delta, self.alpha)
        Jv = torch.einsum("rtd,rd->rt", J, v)
        vv = (v * v).sum(-1)
        diff_sq = (diag - 2 * Jv + vv[:, None]).clamp_min(0)
        keep = diff_sq > 16 * eps * (diag + vv[:, None])
        a = torch.where(keep, c / diff_sq.sqrt().clamp_min(tiny), torch.zeros_like(c))
        beta = 1 - a.sum(-1)
        omega = a.clone()
        Jvn = beta[:, None] * Jv + torch.einsum("rts,rs->rt", G, omega)
        fired = torch.zeros(R, dtype=torch.bool)
        for m in range(T):
            gm2 = diag[:, m]
            bm = Jvn[:, m]
            fire = bm < 0
            fired |= fire
            s = torch.where(fire, gm2 / (gm2 - bm).clamp_min(tiny), torch.ones_like(bm))
            beta = s * beta
            omega = s[:, None] * omega
            omega[:, m] += 1 - s
            Jvn = s[:, None] * Jvn + (1 - s)[:, None] * G[:, :, m]
        tol = 1e2 * eps * norms * (beta.abs() * vv.sqrt() + (omega.abs() * norms).sum(-1))[:, None]
        bad = (Jvn < -tol).any(-1) & active
        if bool(bad.any()):
            for r in bad.nonzero().flatten().tolist():
                omega[r] = omega[r] + dual_cone_weights(G[r], Jvn[r])
        d = beta[:, None] * v + torch.einsum("rt,rtd->rd", omega, J)
        return d, fired & active, bad


# --------------------------------------------------------------------------------------------
# Batched training


def forward_backward(W1: Tensor, b1: Tensor, Wh: Tensor, bh: Tensor, x: Tensor,
                     y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Losses and gradients of R independent copies of the model on their mini-batches.

    Shapes: ``W1 [R, 2, 2]``, ``b1 [R, 2]`` (shared ``Linear(2, 2)``), ``Wh [R, T, 2]``,
    ``bh [R, T]`` (the heads), ``x [R, S, 2]`` inputs, ``y [R, T, S]`` targets.  Returns the MSE
    losses ``[R, T]``, the task Jacobians of the shared parameters ``J [R, T, 6]`` (columns in
    the order of ``Linear.parameters()``: weight row-major, then bias, as the library's flat
    layout has them), and the heads' own gradients ``[R, T, 2]``, ``[R, T]``.
    """
    R, T = Wh.shape[:2]
    S = x.shape[1]
    h = torch.sigmoid(torch.baddbmm(b1[:, None, :], x, W1.transpose(1, 2)))  # [R, S, H]
    out = torch.einsum("rsh,rth->rts", h, Wh) + bh[:, :, None]
    e = out - y
    losses = (e * e).mean(-1)
    de = e * (2.0 / S)  # d loss / d out
    gWh = torch.einsum("rts,rsh->rth", de, h)
    gbh = de.sum(-1)
    dz = de[..., None] * Wh[:, :, None, :] * (h * (1 - h))[:, None]  # [R, T, S, H]
    J = torch.cat([torch.einsum("rtsh,rsk->rthk", dz, x).reshape(R, T, -1), dz.sum(2)], -1)
    return losses, J, gWh, gbh


@dataclass
class BatchedResult:
    conv: Tensor  # [R, T] 1-based convergence epoch per task, 0 = not converged
    params: dict[str, Tensor]  # final W1 [R,2,2], b1 [R,2], Wh [R,T,2], bh [R,T]
    epoch_losses: Tensor | None  # [R, E, T] sum of the two mini-batch losses (record=True)
    segment_steps: Tensor  # [R] tensioned steps where a segment fix fired
    projection_steps: Tensor  # [R] steps where the projection fallback ran
    tension_steps: Tensor  # [R] tensioned steps while the run was active

    @property
    def epochs(self) -> Tensor:
        """[R] epochs to convergence of every task (0 when some task never converged)."""
        done = (self.conv > 0).all(-1)
        return torch.where(done, self.conv.max(-1).values, torch.zeros_like(done, dtype=torch.long))


def train_batched(method: str, runs: Sequence[Run], max_epochs: int, dtype: torch.dtype = torch.float64,
                  freeze: bool = True, record: bool = False) -> BatchedResult:
    """Train every run of ``method`` at once (manual backprop of the tiny MLP over ``[R, ...]``).

    With ``freeze`` a run stops changing once all its tasks have converged (its run has ended),
    and the loop stops when every run has ended; without it every run trains ``max_epochs``.
    """
    tasks, base = METHODS[method].tasks, METHODS[method].base
    T = len(tasks)
    R = len(runs)
    W1 = torch.empty(R, 2, 2, dtype=dtype)
    b1 = torch.empty(R, 2, dtype=dtype)
    Wh = torch.empty(R, T, 2, dtype=dtype)
    bh = torch.empty(R, T, dtype=dtype)
    Y = torch.empty(R, T, 4, dtype=dtype)
    orders = torch.empty(R, max_epochs, 4, dtype=torch.long)
    init_cache: dict[int, tuple[nn.Linear, dict[str, nn.Linear]]] = {}
    with torch.no_grad():
        for i, run in enumerate(runs):
            if run.init_seed not in init_cache:
                init_cache[run.init_seed] = init_model(run.init_seed, tasks, dtype)
            enc, heads = init_cache[run.init_seed]
            W1[i] = enc.weight
            b1[i] = enc.bias
            for t, name in enumerate(tasks):
                Wh[i, t] = heads[name].weight[0]
                bh[i, t] = heads[name].bias[0]
            Y[i] = targets(tasks, run.c, dtype)
            orders[i] = torch.from_numpy(batch_orders(run.seed, max_epochs))
    lr = torch.tensor([run.lr for run in runs], dtype=dtype)
    X = torch.tensor(INPUTS, dtype=dtype)
    params = [W1, b1, Wh, bh]
    bufs = [torch.zeros_like(p) for p in params]
    conv = torch.zeros(R, T, dtype=torch.long)
    active = torch.ones(R, dtype=torch.bool)
    tension = BatchedTension(R, T, dtype) if METHODS[method].tension else None
    seg = torch.zeros(R, dtype=torch.long)
    proj = torch.zeros(R, dtype=torch.long)
    tsteps = torch.zeros(R, dtype=torch.long)
    history = torch.zeros(R, max_epochs, T, dtype=dtype) if record else None
    expand = (R, T, BATCH)
    for epoch in range(max_epochs):
        acc = torch.zeros(R, T, dtype=dtype)
        for j in range(4 // BATCH):
            idx = orders[:, epoch, j * BATCH:(j + 1) * BATCH]  # [R, 2]
            x = X[idx]  # [R, 2 samples, 2 inputs]
            y = Y.gather(2, idx[:, None, :].expand(expand))  # [R, T, 2]
            losses, J, gWh, gbh = forward_backward(W1, b1, Wh, bh, x, y)
            acc += losses
            G = J @ J.transpose(1, 2)
            w = batched_base_weights(base, G)
            v = torch.einsum("rt,rtd->rd", w, J)
            if tension is not None:
                d, fired, projected = tension(J, G, v, losses, active)
                if tension.count > tension.window:
                    tsteps += active
                seg += fired
                proj += projected
            else:
                d = v
            grads = [d[:, :4].reshape(R, 2, 2), d[:, 4:], gWh, gbh]
            step = -(lr * active)
            for p, b, g in zip(params, bufs, grads):
                b.mul_(MOMENTUM).add_(g)
                p.add_(b * step.view(-1, *([1] * (p.dim() - 1))))
        if history is not None:
            history[:, epoch] = acc
        newly = (acc / (4 * T) < THRESHOLD) & (conv == 0)
        conv[newly] = epoch + 1
        if freeze:
            active &= ~(conv > 0).all(-1)
            if not bool(active.any()):
                break
    return BatchedResult(conv, {"W1": W1, "b1": b1, "Wh": Wh, "bh": bh}, history, seg, proj, tsteps)


# --------------------------------------------------------------------------------------------
# The same runs through the library, one by one (the reference for --check)


def train_library(method: str, run: Run, epochs: int, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """Train one run with ``MultiTaskOptimizer`` and the library aggregator, ``epochs`` epochs."""
    tasks = METHODS[method].tasks
    enc, heads = init_model(run.init_seed, tasks, dtype)
    head_list = [heads[name] for name in tasks]
    params = [*enc.parameters(), *(p for name in HEAD_CREATION if name in heads for p in heads[name].parameters())]
    sgd = torch.optim.SGD(params, lr=run.lr, momentum=MOMENTUM)
    opt = MultiTaskOptimizer(sgd, shared=enc, aggregator=make_aggregator(method), diagnostics=False)
    X = torch.tensor(INPUTS, dtype=dtype)
    Y = targets(tasks, run.c, dtype)
    orders = batch_orders(run.seed, epochs)
    epoch_losses = torch.zeros(epochs, len(tasks), dtype=dtype)
    for epoch in range(epochs):
        for j in range(4 // BATCH):
            idx = torch.from_numpy(orders[epoch, j * BATCH:(j + 1) * BATCH])
            z = torch.sigmoid(enc(X[idx]))
            losses = [nn.functional.mse_loss(head(z), Y[t, idx][:, None]) for t, head in enumerate(head_list)]
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
            epoch_losses[epoch] += torch.stack([loss.detach() for loss in losses])
    return {
        "W1": enc.weight.detach().clone(),
        "b1": enc.bias.detach().clone(),
        "Wh": torch.stack([h.weight.detach()[0] for h in head_list]),
        "bh": torch.stack([h.bias.detach()[0] for h in head_list]),
        "epoch_losses": epoch_losses,
    }


def check(methods: Sequence[str], seeds: Sequence[int], lrs: Sequence[float], epochs: int,
          scales: Sequence[float] = SCALES, protocols: Sequence[str] = PROTOCOLS,
          dtype: torch.dtype = torch.float64, rtol: float = 1e-8, atol: float = 1e-10) -> dict[str, dict[str, float]]:
    """Train the runs both ways and compare; raise ``AssertionError`` on any mismatch.

    Returns per method the largest parameter and epoch-loss differences, and how many
    tensioned steps fired a segment fix / the projection fallback (so a caller can see that
    those branches were exercised).
    """
    report: dict[str, dict[str, float]] = {}
    runs = [Run(p, c, s, lr) for p in protocols for c in scales for s in seeds for lr in lrs]
    for method in methods:
        res = train_batched(method, runs, epochs, dtype, freeze=False, record=True)
        assert res.epoch_losses is not None
        worst_p = 0.0
        worst_l = 0.0
        for i, run in enumerate(runs):
            ref = train_library(method, run, epochs, dtype)
            for key in ("W1", "b1", "Wh", "bh"):
                got, want = res.params[key][i], ref[key]
                if not torch.allclose(got, want, rtol=rtol, atol=atol):
                    raise AssertionError(f"{method} {run}: {key} differs: batched {got.tolist()} vs "
                                         f"library {want.tolist()}")
                worst_p = max(worst_p, float((got - want).abs().max()))
            got_l, want_l = res.epoch_losses[i], ref["epoch_losses"]
            if not torch.allclose(got_l, want_l, rtol=rtol, atol=atol):
                e = int((~torch.isclose(got_l, want_l, rtol=rtol, atol=atol)).any(-1).nonzero()[0])
                raise AssertionError(f"{method} {run}: epoch {e + 1} losses differ: batched "
                                     f"{got_l[e].tolist()} vs library {want_l[e].tolist()}")
            worst_l = max(worst_l, float((got_l - want_l).abs().max()))
        report[method] = {
            "runs": float(len(runs)),
            "max_param_diff": worst_p,
            "max_loss_diff": worst_l,
            "segment_steps": float(res.segment_steps.sum()),
            "projection_steps": float(res.projection_steps.sum()),
            "tension_steps": float(res.tension_steps.sum()),
        }
    return report


# --------------------------------------------------------------------------------------------
# Summaries


def _stats(epochs: np.ndarray) -> tuple[float, float, float]:
    """(rate %, mean, std) over runs from 1-based epochs (0 = not converged).

    Mean and (population) std are over the converged runs and in the paper's convention, the
    0-based index of the last epoch (1-based count - 1).
    """
    ok = epochs[epochs > 0] - 1
    rate = 100.0 * ok.size / epochs.size
    if ok.size == 0:
        return rate, float("nan"), float("nan")
    return rate, float(ok.mean()), float(ok.std())


def summarise(epochs: np.ndarray) -> dict[str, Any]:
    """``epochs``: ``[n_seeds, n_lrs]`` (0 = not converged).  Best single lr, best lr per seed."""
    per_lr = [_stats(epochs[:, k]) for k in range(epochs.shape[1])]
    best_k = min(range(len(LRS)), key=lambda k: (-per_lr[k][0], per_lr[k][1] if per_lr[k][0] > 0 else math.inf))
    masked = np.where(epochs > 0, epochs, np.iinfo(np.int64).max)
    per_seed = np.where((epochs > 0).any(1), masked.min(1), 0)
    return {"per_lr": per_lr, "best_lr": LRS[best_k], "best": per_lr[best_k], "per_seed": _stats(per_seed)}


def _fmt(stats: tuple[float, float, float]) -> tuple[str, str]:
    rate, mean, std = stats
    if math.isnan(rate):
        return "n/a", "n/a"
    ep = "-" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"
    return f"{rate:.0f}", ep


def tables(results: dict[str, Any], methods: Sequence[str], protocols: Sequence[str] = PROTOCOLS,
           scales: Sequence[float] = SCALES) -> str:
    """Markdown tables: per c, the paper's numbers beside both protocols; then the lr grids."""
    lines: list[str] = []
    na = {"best": (float("nan"),) * 3, "per_seed": (float("nan"),) * 3, "best_lr": float("nan")}
    for c in scales:
        n = "1" if c == 1.0 else "2"
        lines += [f"### c = {c:g} (paper Table {n})", "",
                  "| Method | Paper rate % | Paper epochs | Fixed init (paper protocol): best lr | rate % | epochs "
                  "| Varied init, best lr per seed: rate % | epochs | Varied init, best single lr: lr | rate % | epochs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            p = PAPER[c].get(METHODS[m].paper)
            prate, pep = (f"{p[0]:.0f}", f"{p[1]:.2f} ± {p[2]:.2f}") if p else ("", "")
            a = results.get(f"paper/{c:g}/{m}", na)
            b = results.get(f"varied/{c:g}/{m}", na)
            ar, ae = _fmt(a["best"])
            br, be = _fmt(b["per_seed"])
            cr, ce = _fmt(b["best"])
            alr = f"{a['best_lr']:g}" if a["best"][0] > 0 else "none"
            blr = f"{b['best_lr']:g}" if b["best"][0] > 0 else "none"
            lines.append(f"| {METHODS[m].label} | {prate} | {pep} | {alr} | {ar} | {ae} | {br} | {be} "
                         f"| {blr} | {cr} | {ce} |")
        lines.append("")
    lines += ["### Every learning rate (rate % / mean epochs of the converged runs)", ""]
    for proto in protocols:
        for c in scales:
            lines += [f"{'Fixed' if proto == 'paper' else 'Varied'} init, c = {c:g}:", "",
                      "| Method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |",
                      "|---|" + "---|" * len(LRS)]
            for m in methods:
                cells = []
                for st in results[f"{proto}/{c:g}/{m}"]["per_lr"]:
                    cells.append(f"{st[0]:.0f} / {st[1]:.0f}" if st[0] > 0 else "0 / -")
                lines.append(f"| {METHODS[m].label} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def run_all(methods: Sequence[str], n_seeds: int, max_epochs: int, dtype: torch.dtype,
            protocols: Sequence[str] = PROTOCOLS, scales: Sequence[float] = SCALES) -> tuple[dict[str, Any], str]:
    """Train everything; returns the summaries (keyed ``protocol/c/method``) and a diagnostics text."""
    runs = [Run(p, c, s, lr) for p in protocols for c in scales for s in range(n_seeds) for lr in LRS]
    results: dict[str, Any] = {}
    diag: list[str] = []
    for method in methods:
        t0 = time.perf_counter()
        res = train_batched(method, runs, max_epochs, dtype)
        ep = res.epochs.numpy()
        for p in protocols:
            for c in scales:
                sel = [i for i, r in enumerate(runs) if r.protocol == p and r.c == c]
                grid = ep[sel].reshape(n_seeds, len(LRS))
                s = summarise(grid)
                s["raw"] = grid.tolist()
                if METHODS[method].tension:
                    k = LRS.index(s["best_lr"])
                    pick = [sel[j * len(LRS) + k] for j in range(n_seeds)]
                    t = int(res.tension_steps[pick].sum())
                    sg = int(res.segment_steps[pick].sum())
                    pr = int(res.projection_steps[pick].sum())
                    s["segment"] = (sg, pr, t)
                    diag.append(f"{METHODS[method].label}, {'fixed' if p == 'paper' else 'varied'} init, c = {c:g}, "
                                f"lr {s['best_lr']:g}: segment fix fired on {sg} of {t} tensioned steps "
                                f"({100.0 * sg / max(t, 1):.1f}%), projection fallback on {pr}")
                results[f"{p}/{c:g}/{method}"] = s
        print(f"[{method}] {len(runs)} runs in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return results, "\n".join(diag)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50, help="seeds per configuration (default 50)")
    ap.add_argument("--max-epochs", type=int, default=3000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--scales", nargs="+", type=float, default=list(SCALES), choices=list(SCALES))
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", help="write the raw and summarised results here")
    ap.add_argument("--check", action="store_true", help="compare batched training with the library")
    ap.add_argument("--check-seeds", type=int, default=2)
    ap.add_argument("--check-epochs", type=int, default=100)
    ap.add_argument("--check-lrs", type=float, nargs="+", default=[5e-2, 1e-2])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    t0 = time.perf_counter()
    if args.check:
        rep = check(args.methods, list(range(args.check_seeds)), args.check_lrs, args.check_epochs,
                    args.scales, args.protocols, dtype=dtype)
        for m, r in rep.items():
            print(f"{m:16s} {int(r['runs'])} runs x {args.check_epochs} epochs: max |param diff| "
                  f"{r['max_param_diff']:.2e}, max |epoch loss diff| {r['max_loss_diff']:.2e}, "
                  f"segment fixes {int(r['segment_steps'])}/{int(r['tension_steps'])} tensioned steps, "
                  f"projection fallbacks {int(r['projection_steps'])}")
        print(f"check passed in {time.perf_counter() - t0:.1f} s")
        return 0
    results, diag = run_all(args.methods, args.seeds, args.max_epochs, dtype, args.protocols, args.scales)
    wall = time.perf_counter() - t0
    print(tables(results, args.methods, args.protocols, args.scales))
    print("Tensioner feasibility (best lr, all seeds):\n" + diag)
    print(f"\nwall time {wall:.1f} s ({args.seeds} seeds, {args.max_epochs} max epochs, {args.dtype}, "
          f"{args.threads} thread(s))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
