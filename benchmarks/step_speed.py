"""Speed and peak memory of one multi-task step: torch_mtlgrad's capture modes against
``sum(losses).backward()``, TorchJD and a LibMTL-style loop (the same script runs on a GPU).

Setup (the reference setup): a shared encoder, one linear head per task, a batch of 64 inputs of
3 x 64 x 64, T = 3, 10, 40.  The encoder is torchvision's ResNet-18 up to its average pool
(512 features, ``fc`` replaced by the identity) where torchvision is installed, else the built-in
:class:`ConvNet` (four stride-2 3x3 conv + BatchNorm + ReLU blocks, then an average pool).  Each
head is ``Linear(features, 10)`` with a cross-entropy loss on fixed random labels; the model is in
train mode (BatchNorm on batch statistics).

One timed step is what a training loop does before ``optimizer.step()``: ``zero_grad``, the
forward pass, and the method's backward (for the multi-task methods: the capture of ``J``, the
aggregation and the write into ``.grad``).  The parameters are not updated, so every step sees
the same model and batch.  The wrapped optimizer's ``step()`` is the same for every method and
is left out.

Methods (row keys, selectable with ``--methods``):

* ``sum``: ``sum(losses).backward()``, the baseline every ratio refers to.
* ``loop:<agg>``, ``batched:<agg>``, ``feature:<agg>`` for ``<agg>`` = ``mgda`` and
  ``central+tension``: :class:`torch_mtlgrad.MultiTaskOptimizer` with ``capture=`` that mode,
  ``diagnostics=False``.
* ``auto:mgda``: the default exact mode (``capture="auto"`` with ``features=z``; the note column
  says which capture it ran as: the loop on the CPU, the feature mode on a GPU);
  ``timed:mgda`` with ``capture="timed"`` (on the CPU the mode it chose by timing its first
  steps, which fall in the warm-up when ``--warmup`` is at least 6);
  ``auto:mgda+diag`` the same with ``diagnostics=True`` (what diagnostics cost);
  ``auto:mgda+unchecked`` with ``nonfinite="unchecked"`` (no host-device sync for the finiteness
  check); ``auto:upgrad`` our UPGrad, to set beside TorchJD's.
* ``loop:mean``, ``auto:mean``, ``loop:dwa``, ``auto:dwa``: methods whose weights read only the
  loss values.  ``capture="auto"`` takes the loss-only route (no ``J``: one backward of
  ``sum_t w_t L_t``, then one of ``sum_t L_t`` restricted to the heads; the note column says it
  ran as ``'losses'``), ``capture="loop"`` the old route that builds ``J`` task by task.  The
  full comparison (every loss-only method, an MLP as well, 1 and 2 threads, GradNorm at one layer)
  is ``benchmarks/loss_only_speed.py``.
* ``representation:mgda``: the representation-gradient approximation (MGDA-UB style);
  ``representation:mgda-pgd`` with the fixed-iteration on-device min-norm solver
  (``MinNorm(method="pgd")``) instead of the exact host solver.
* ``feature:mgda+chunk8``: the feature mode in batched passes of at most 8 tasks (memory
  against speed).
* ``torchjd:mgda``, ``torchjd:upgrad``: TorchJD 0.18 ``autojac.mtl_backward(losses, features=z)``
  then ``autojac.jac_to_grad(shared, MGDA() / UPGrad())``, with ``shared_params`` and
  ``tasks_params`` passed explicitly (no graph search per step).  Rows are marked "not installed"
  when torchjd is absent (it is a benchmark-only dependency).
* ``libmtl:mgda``: LibMTL's way, written here: one ``torch.autograd.grad`` per task, its gradient
  ``torch.cat``-ed into a preallocated ``[T, D]`` matrix, ``G = J J^T``, a Frank-Wolfe min-norm
  solve (Sener and Koltun 2018, Algorithm 2; at most 250 iterations, stop when the step is under
  1e-5, a data-dependent loop that synchronises), and a per-parameter write-back of ``d``.

Measurement: one process, one model and batch per T; methods run in turn, each after a warm-up,
then ``--steps`` timed steps (CUDA events on a GPU, ``time.perf_counter`` on the CPU); the table
gives the median and the interquartile range, and on the CPU also the median process CPU time
(``time.process_time``), which other processes on a shared machine do not inflate: with one
thread a row ran undisturbed when its wall and CPU times agree.  ``--threads 1`` is the setting
to use on a busy machine (two OpenMP threads on two shared cores stall badly).  ``--rounds R``
repeats the whole sequence R times (each method rebuilt every round) and pools the steps, which
evens out a shared machine's load.
The report's header names the measured code (git commit and a hash of the package's sources).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the method's warm-up and steps
(absolute: model, batch and activations included), reset before the method's state is built;
on the CPU the growth of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) over its resident set before the method's state is
built (the model and batch are already resident, so it measures everything the step allocates:
activations, ``J``, buffers kept between steps, workspace).  Where ``/proc`` cannot be reset the
column says n/a.

The column "rel. diff" is ``||g - g_ref|| / ||g_ref||`` over the shared parameters' ``.grad``
after the last step, with ``g_ref`` the loop mode with the same aggregator (UPGrad rows: our
``auto:upgrad``): the exact modes must agree to rounding; the representation mode and TorchJD's
and LibMTL's Frank-Wolfe MGDA are approximations and show by how much.

Usage::

    python benchmarks/step_speed.py                      # the reference setup (GPU if present)
    python benchmarks/step_speed.py --quick --threads 1  # CPU: smaller input, see --help
    python benchmarks/step_speed.py --methods sum,auto:mgda,torchjd:mgda --tasks 40 --rounds 3
    python benchmarks/step_speed.py --out /tmp/step_speed.md     # also write the report
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import itertools
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get as get_aggregator

Step = Callable[[], None]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What one benchmark run measures.

    The defaults are the reference setup: T = 3, 10, 40, a batch of 64 inputs of 3 x 64 x 64,
    ResNet-18 where torchvision is installed (``model="auto"``), 20 timed steps after 5 of
    warm-up.

    Example:
        >>> Config(tasks=(2,), steps=2).batch
        64
    """

    tasks: tuple[int, ...] = (3, 10, 40)
    batch: int = 64
    size: int = 64
    model: str = "auto"  # "auto" | "resnet18" | "convnet"
    width: int = 32  # ConvNet's first block's channels (then 2x, 4x, 8x)
    classes: int = 10
    steps: int = 20
    warmup: int = 5
    rounds: int = 1
    device: str = "auto"
    methods: tuple[str, ...] | None = None  # None: all
    seed: int = 0


QUICK = {"model": "convnet", "batch": 32, "size": 32, "warmup": 3}


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def torchjd_version() -> str | None:
    try:
        import torchjd
    except ImportError:
        return None
    return getattr(torchjd, "__version__", None) or _dist_version("torchjd")


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except ImportError:  # PackageNotFoundError is one
        return "?"


def source_fingerprint() -> str:
    """The torch_mtlgrad code that was measured: git commit (``+dirty`` when the package has
    uncommitted changes) and a short hash of the package's ``.py`` files."""
    import hashlib
    import subprocess

    import torch_mtlgrad

    pkg = os.path.dirname(torch_mtlgrad.__file__)
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(pkg)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(name.encode() + f.read())
    commit = "?"
    try:
        top = os.path.dirname(pkg)
        commit = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--", pkg], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        if dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{commit}, package sha256 {h.hexdigest()[:12]}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """The built-in encoder where torchvision is absent: four blocks of stride-2 3x3 convolution,
    BatchNorm and ReLU (``width``, 2x, 4x, 8x channels), then a global average pool.

    Example:
        >>> ConvNet(width=4)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(chans):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_encoder(model: str, width: int) -> tuple[nn.Module, int, str]:
    """(encoder, feature count, description)."""
    if model == "auto":
        model = "resnet18" if has_torchvision() else "convnet"
    if model == "resnet18":
        import torchvision

        enc = torchvision.models.resnet18(weights=None)
        enc.fc = nn.Identity()
        return enc, 512, "torchvision ResNet-18 up to avgpool"
    if model == "convnet":
        net = ConvNet(width)
        return net, net.features, f"built-in ConvNet(width={width})"
    raise ValueError(f"model must be 'auto', 'resnet18' or 'convnet', got {model!r}")


@dataclass
class Setup:
    """One model and batch for T tasks, shared by every method of that T."""

    encoder: nn.Module
    heads: nn.ModuleList
    x: Tensor
    ys: list[Tensor]
    description: str

    @property
    def T(self) -> int:
        return len(self.heads)

    def parameters(self) -> list[Tensor]:
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def shared(self) -> list[Tensor]:
        return list(self.encoder.parameters())

    def forward(self) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(self.x)
        return z, [F.cross_entropy(h(z), y) for h, y in zip(self.heads, self.ys)]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None


def build_setup(config: Config, T: int, device: torch.device) -> Setup:
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    encoder, feats, desc = make_encoder(config.model, config.width)
    heads = nn.ModuleList(nn.Linear(feats, config.classes) for _ in range(T))
    x = torch.randn(config.batch, 3, config.size, config.size, generator=gen)
    ys = [torch.randint(config.classes, (config.batch,), generator=gen) for _ in range(T)]
    encoder.to(device).train()
    heads.to(device).train()
    return Setup(encoder, heads, x.to(device), [y.to(device) for y in ys], desc)


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the table: ``build(setup)`` returns the step to time."""

    key: str
    label: str
    build: Callable[[Setup], Step]
    ref: str | None = None  # key of the row whose .grad this one is compared with
    exact: bool = True  # computes the exact J (not an approximation)
    family: str = "ours"  # "baseline" | "ours" | "loss-only" | "torchjd" | "libmtl"


def _sum_step(setup: Setup) -> Step:
    def step() -> None:
        setup.zero_grad()
        _, losses = setup.forward()
        sum(losses).backward()

    return step


def _ours(capture: str, aggregator: str, features: bool, agg_kw: dict[str, Any] | None = None,
          **kw: Any) -> Callable[[Setup], Step]:
    def build(setup: Setup) -> Step:
        agg = get_aggregator(aggregator, **agg_kw) if agg_kw else aggregator
        opt = MultiTaskOptimizer(torch.optim.SGD(setup.parameters(), lr=0.0), shared=setup.encoder,
                                 aggregator=agg, capture=capture, **{"diagnostics": False, **kw})

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            z, losses = setup.forward()
            if features:
                opt.backward(losses, features=z)
            else:
                opt.backward(losses)

        def describe() -> str:
            # Which capture actually ran (capture="auto" resolves by device or by timing; a
            # batched pass that fails falls back to the loop).
            used = getattr(opt, "last_capture", None)
            if used is None or used == capture:
                return ""
            return f"capture={capture!r} ran as {used!r}"

        step.describe = describe  # type: ignore[attr-defined]
        return step

    return build


def _torchjd(aggregator: str) -> Callable[[Setup], Step]:
    def build(setup: Setup) -> Step:
        from torchjd.aggregation import MGDA, UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = {"mgda": MGDA, "upgrad": UPGrad}[aggregator]()
        shared = setup.shared()
        tasks_params = [list(h.parameters()) for h in setup.heads]

        def step() -> None:
            setup.zero_grad()
            z, losses = setup.forward()
            mtl_backward(losses, features=z, tasks_params=tasks_params, shared_params=shared)
            jac_to_grad(shared, agg)

        return step

    return build


def frank_wolfe_min_norm(G: Tensor, max_iter: int = 250, stop: float = 1e-5) -> Tensor:
    """Min-norm weights on the simplex by Frank-Wolfe over the Gramian (Sener and Koltun 2018,
    Algorithm 2): start uniform, move towards the vertex of the smallest ``(G w)_t`` with the
    exact line search of the two-point problem; stop after ``max_iter`` steps or when the step
    size is under ``stop``.  Data-dependent loop (host syncs), as LibMTL's solver has.

    Example:
        >>> w = frank_wolfe_min_norm(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        >>> [round(v, 3) for v in w.tolist()]
        [0.8, 0.2]
    """
    T = G.shape[0]
    w = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
    for _ in range(max_iter):
        Gw = G @ w
        t = int(torch.argmin(Gw))
        a = float(w @ Gw)  # ||w^T J||^2
        b = float(Gw[t])  # <w^T J, g_t>
        c = float(G[t, t])  # ||g_t||^2
        # minimise ||(1 - s) v + s g_t||^2 over s in [0, 1]
        denom = a - 2 * b + c
        s = 0.0 if denom <= 0 else min(max((a - b) / denom, 0.0), 1.0)
        w = (1 - s) * w
        w[t] += s
        if s < stop:
            break
    return w


def _libmtl(setup: Setup) -> Step:
    shared = setup.shared()
    numels = [p.numel() for p in shared]
    D = sum(numels)
    n = len(shared)
    heads = [list(h.parameters()) for h in setup.heads]
    device = shared[0].device

    def step() -> None:
        setup.zero_grad()
        _, losses = setup.forward()
        T = len(losses)
        J = torch.zeros(T, D, device=device)
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, [*shared, *heads[t]], retain_graph=t < T - 1)
            J[t] = torch.cat([g.reshape(-1) for g in grads[:n]])
            for p, g in zip(heads[t], grads[n:]):
                p.grad = g
        w = frank_wolfe_min_norm(J @ J.T)
        d = w @ J
        off = 0
        for p, k in zip(shared, numels):
            p.grad = d[off : off + k].view_as(p).clone()
            off += k

    return step


def methods() -> list[Method]:
    """Every row, in table order."""
    rows = [Method("sum", "`sum(losses).backward()`", _sum_step, family="baseline")]
    for agg in ("mgda", "central+tension"):
        rows += [
            Method(f"loop:{agg}", f"ours loop, {agg}", _ours("loop", agg, False)),
            Method(f"batched:{agg}", f"ours batched, {agg}", _ours("batched", agg, False), ref=f"loop:{agg}"),
            Method(f"feature:{agg}", f"ours feature, {agg}", _ours("feature", agg, True), ref=f"loop:{agg}"),
        ]
    rows += [
        Method("auto:mgda", "ours default (auto), mgda", _ours("auto", "mgda", True), ref="loop:mgda"),
        Method("auto:mgda+diag", "ours default, mgda, diagnostics=True",
               _ours("auto", "mgda", True, diagnostics=True), ref="loop:mgda"),
        Method("auto:mgda+unchecked", "ours default, mgda, nonfinite=unchecked",
               _ours("auto", "mgda", True, nonfinite="unchecked"), ref="loop:mgda"),
        Method("auto:upgrad", "ours default, upgrad", _ours("auto", "upgrad", True)),
        Method("timed:mgda", "ours timed, mgda", _ours("timed", "mgda", True), ref="loop:mgda"),
    ]
    for agg in ("mean", "dwa"):
        rows += [
            Method(f"loop:{agg}", f"ours loop (builds J), {agg}", _ours("loop", agg, False),
                   family="loss-only"),
            Method(f"auto:{agg}", f"ours default (auto, loss-only), {agg}", _ours("auto", agg, False),
                   ref=f"loop:{agg}", family="loss-only"),
        ]
    rows += [
        Method("representation:mgda", "ours representation, mgda (approx.)",
               _ours("representation", "mgda", True), ref="loop:mgda", exact=False),
        Method("representation:mgda-pgd", "ours representation, mgda pgd solver (approx.)",
               _ours("representation", "mgda", True, agg_kw={"method": "pgd"}), ref="loop:mgda",
               exact=False),
        Method("feature:mgda+chunk8", "ours feature, mgda, chunk_size=8",
               _ours("feature", "mgda", True, chunk_size=8), ref="loop:mgda"),
        Method("torchjd:mgda", "TorchJD mtl_backward + jac_to_grad, MGDA", _torchjd("mgda"),
               ref="loop:mgda", family="torchjd"),
        Method("torchjd:upgrad", "TorchJD mtl_backward + jac_to_grad, UPGrad", _torchjd("upgrad"),
               ref="auto:upgrad", family="torchjd"),
        Method("libmtl:mgda", "LibMTL-style loop + cat + FW MGDA", _libmtl, ref="loop:mgda", family="libmtl"),
    ]
    return rows


def select_methods(keys: Sequence[str] | None) -> list[Method]:
    all_rows = methods()
    if keys is None:
        return all_rows
    known = {m.key: m for m in all_rows}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(known)}")
    return [m for m in all_rows if m.key in set(keys)]


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------
def time_steps(step: Step, n: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Milliseconds of each of ``n`` calls of ``step``: (elapsed, process CPU time).

    Elapsed is measured with CUDA events on a GPU, with the wall clock elsewhere.  The process CPU
    time (all threads; empty on a GPU) does not grow when other processes take the cores, so it
    shows what the step costs on a shared machine where the wall clock is noisy.
    """
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize(device)
        for s, e in zip(starts, ends):
            s.record()
            step()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)], []
    wall, cpu = [], []
    for _ in range(n):
        c0 = time.process_time()
        t0 = time.perf_counter()
        step()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a stretch of code, in MiB (see the module docstring for what it counts)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_kib: int | None = None
        self._libc: Any = None
        if device.type != "cuda":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "peak `torch.cuda.max_memory_allocated` (MiB, absolute)"
        return "peak RSS growth over the step (MiB, Linux VmHWM)"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.baseline_kib = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return
        self.baseline_kib = _proc_status_kib("VmRSS")

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.baseline_kib is None:
            return None
        hwm = _proc_status_kib("VmHWM")
        return None if hwm is None else (hwm - self.baseline_kib) / 1024


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One method at one T."""

    T: int
    key: str
    label: str
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    rel_diff: float | None = None
    note: str = ""
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.nan

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else math.nan

    @property
    def iqr(self) -> float:
        if len(self.times_ms) < 2:
            return math.nan
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times_ms)


@dataclass
class Result:
    config: Config
    device: torch.device
    rows: list[Row]
    meta: dict[str, str]


def _flat_grads(params: Sequence[Tensor]) -> Tensor | None:
    if any(p.grad is None for p in params):
        return None
    return torch.cat([p.grad.detach().reshape(-1).double().cpu() for p in params])


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def run_method(method: Method, setup: Setup, config: Config, device: torch.device,
               memory: PeakMemory) -> tuple[tuple[list[float], list[float]], float | None, Tensor | None, str]:
    """Build, warm up and time one method; returns ((elapsed ms, CPU ms), peak MiB, shared grad,
    warnings)."""
    memory.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = method.build(setup)
        for _ in range(config.warmup):
            step()
        times = time_steps(step, config.steps, device)
    peak = memory.stop()
    grad = _flat_grads(setup.shared())
    describe = getattr(step, "describe", None)
    seen: list[str] = [describe()] if callable(describe) and describe() else []
    del step, describe
    for w in caught:
        msg = str(w.message).splitlines()[0][:100]
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) or msg in seen:
            continue
        seen.append(msg)
    return times, peak, grad, "; ".join(seen)


def prime(chosen: Sequence[Method], setup: Setup, torchjd_installed: bool) -> None:
    """One untimed step of every method (errors are left for the measured pass to report)."""
    for m in chosen:
        if m.family == "torchjd" and not torchjd_installed:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.build(setup)()
        except Exception:  # noqa: BLE001, S110 - the measured pass runs it again and reports it
            pass
        setup.zero_grad()
    gc.collect()


def run_benchmark(config: Config, log: Callable[[str], None] | None = None) -> Result:
    """Run every selected method at every T; the core of the script (also used by the tests).

    Example:
        >>> cfg = Config(tasks=(2,), batch=2, size=8, model="convnet", width=2, steps=1, warmup=0,
        ...              methods=("sum", "libmtl:mgda"))
        >>> [r.key for r in run_benchmark(cfg).rows]
        ['sum', 'libmtl:mgda']
    """
    device = resolve_device(config.device)
    chosen = select_methods(config.methods)
    source = source_fingerprint()
    memory = PeakMemory(device)
    jd = torchjd_version()
    rows: list[Row] = []
    description = ""
    D = 0
    for T in config.tasks:
        setup = build_setup(config, T, device)
        description = setup.description
        D = sum(p.numel() for p in setup.shared())
        # Throwaway steps: lazy initialisations (thread pools, cuDNN/oneDNN handles, lazy imports
        # of solvers and of torchjd) happen before anything is measured.
        _sum_step(setup)()
        if T == config.tasks[0]:
            prime(chosen, setup, jd is not None)
        by_key: dict[str, Row] = {m.key: Row(T, m.key, m.label) for m in chosen}
        refs: dict[str, Tensor] = {}
        needed_refs = {m.ref for m in chosen if m.ref is not None}
        for r in range(config.rounds):
            for m in chosen:
                row = by_key[m.key]
                if row.error is not None:
                    continue
                if m.family == "torchjd" and jd is None:
                    row.error = "torchjd not installed"
                    continue
                try:
                    times, peak, grad, note = run_method(m, setup, config, device, memory)
                except Exception as exc:  # noqa: BLE001 - a failing row says why; the others go on
                    row.error = _short(exc)
                    setup.zero_grad()
                    if log:
                        log(f"T={T} {m.key}: {row.error}")
                    continue
                row.times_ms += times[0]
                row.cpu_ms += times[1]
                if peak is not None:
                    row.peak_mib = peak if row.peak_mib is None else max(row.peak_mib, peak)
                if note and note not in row.note:
                    row.note = note if not row.note else f"{row.note}; {note}"
                if r == config.rounds - 1 and grad is not None:
                    if m.key in needed_refs:
                        refs[m.key] = grad
                    ref = refs.get(m.ref) if m.ref is not None else None
                    if ref is not None:
                        row.rel_diff = float((grad - ref).norm() / ref.norm().clamp_min(1e-300))
                setup.zero_grad()
                if log:
                    log(f"T={T} {m.key}: median {statistics.median(times[0]):.1f} ms"
                        + (f", peak {peak:.0f} MiB" if peak is not None else ""))
        rows += [by_key[m.key] for m in chosen]
        del setup, refs
        gc.collect()
    meta = {
        "device": _device_name(device),
        "torch_mtlgrad": source,
        "torch": torch.__version__,
        "torchjd": jd or "not installed",
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "-",
        "model": f"{description}, D = {D:,} shared parameters (at the last T)",
        "input": f"batch {config.batch} of 3x{config.size}x{config.size}, "
                 f"{config.classes}-class linear head per task",
        "timing": f"{config.warmup} warm-up + {config.steps} timed steps per method"
                  + (f", {config.rounds} rounds pooled" if config.rounds > 1 else "")
                  + (", CUDA events" if device.type == "cuda" else ", wall clock"),
        "memory": memory.kind,
    }
    return Result(config, device, rows, meta)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} logical cores"


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(result: Result) -> str:
    """The markdown table of a run, T by T, with ratios to that T's ``sum().backward()``.

    On the CPU two more columns give the median process CPU time and its ratio (see
    :func:`time_steps`).
    """
    cpu = result.device.type != "cuda"
    mem_label = "peak RSS growth MiB" if cpu else "peak MiB"
    head = "| T | method | median ms | IQR ms | x sum() |"
    if cpu:
        head += " CPU ms | x sum() (CPU) |"
    head += f" {mem_label} | rel. diff | note |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for T in result.config.tasks:
        rows = [r for r in result.rows if r.T == T]
        base = next((r for r in rows if r.key == "sum" and r.ok), None)
        for r in rows:
            if not r.ok:
                lines.append(f"| {T} | {r.label} | - | - | - |" + (" - | - |" if cpu else "")
                             + f" - | - | {r.error} |")
                continue
            ratio = r.median / base.median if base is not None else None
            line = f"| {T} | {r.label} | {r.median:.1f} | {_fmt(r.iqr)} | {_fmt(ratio, '.2f')} |"
            if cpu:
                cratio = r.cpu_median / base.cpu_median if base is not None else None
                line += f" {_fmt(r.cpu_median)} | {_fmt(cratio, '.2f')} |"
            rel = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
            lines.append(line + f" {_fmt(r.peak_mib, '.0f')} | {rel} | {r.note} |")
    return "\n".join(lines)


def check_bars(result: Result) -> list[str]:
    """The project's speed and memory goals, each with PASS / FAIL / n/a and the numbers behind it.

    On the CPU: the default exact mode no slower than TorchJD with the same aggregator, at every
    T; the loss-only route (``auto:mean``, ``auto:dwa``) within 1.15x of ``sum().backward()``;
    the representation mode within 1.5x of ``sum().backward()``; peak memory of the default
    mode no higher than TorchJD's.  On a GPU: our best exact mode faster than TorchJD's best at
    every T, by at least 25% at the largest T.  Time bars are judged on the elapsed median; on the
    CPU the same comparison on the CPU-time median follows in brackets.
    """
    out = []
    cpu = result.device.type != "cuda"

    def get(T: int, key: str) -> Row | None:
        r = next((r for r in result.rows if r.T == T and r.key == key), None)
        return r if r is not None and r.ok else None

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def also_cpu(a: Row, b: Row, ok: Callable[[float], bool]) -> str:
        if not cpu or not a.cpu_ms or not b.cpu_ms:
            return ""
        x = a.cpu_median / b.cpu_median
        return f" [CPU time: {a.cpu_median:.1f} vs {b.cpu_median:.1f} ms, {x:.2f}x: {verdict(ok(x))}]"

    exact_ours = [m.key for m in methods() if m.family == "ours" and m.exact]
    jd_keys = [m.key for m in methods() if m.family == "torchjd"]
    Tmax = max(result.config.tasks)
    for T in result.config.tasks:
        for ours, theirs in (("auto:mgda", "torchjd:mgda"), ("auto:upgrad", "torchjd:upgrad")):
            a, b = get(T, ours), get(T, theirs)
            if a is None or b is None:
                out.append(f"- T={T}: {ours} vs {theirs}: n/a (a row is missing)")
                continue
            x = a.median / b.median
            out.append(f"- T={T}: time {ours} {a.median:.1f} ms vs {theirs} {b.median:.1f} ms "
                       f"({x:.2f}x): {verdict(x <= 1)}" + also_cpu(a, b, lambda v: v <= 1))
            if a.peak_mib is not None and b.peak_mib is not None:
                out.append(f"- T={T}: memory {ours} {a.peak_mib:.0f} MiB vs {theirs} {b.peak_mib:.0f} MiB: "
                           f"{verdict(a.peak_mib <= b.peak_mib)}")
        base = get(T, "sum")
        for key in ("auto:mean", "auto:dwa"):
            a = get(T, key)
            if a is not None and base is not None:
                x = a.median / base.median
                out.append(f"- T={T}: {key} (loss-only route) {x:.2f}x sum() (bar 1.15x): "
                           f"{verdict(x <= 1.15)}" + also_cpu(a, base, lambda v: v <= 1.15))
        rep = get(T, "representation:mgda")
        if rep is not None and base is not None:
            x = rep.median / base.median
            out.append(f"- T={T}: representation:mgda {x:.2f}x sum() (bar 1.5x): {verdict(x <= 1.5)}"
                       + also_cpu(rep, base, lambda v: v <= 1.5))
        best = min((r for k in exact_ours if (r := get(T, k)) is not None), key=lambda r: r.median,
                   default=None)
        jd_best = min((r for k in jd_keys if (r := get(T, k)) is not None), key=lambda r: r.median,
                      default=None)
        if best is not None and jd_best is not None:
            gain = 1 - best.median / jd_best.median
            need = 0.25 if T == Tmax else 0.0
            out.append(f"- T={T}: best exact ours ({best.key}, {best.median:.1f} ms) vs best TorchJD "
                       f"({jd_best.key}, {jd_best.median:.1f} ms): {gain:+.0%} faster "
                       f"(GPU bar {'>= 25%' if need else '> 0'}): "
                       f"{verdict(gain >= need if need else gain > 0)}")
    return out


def format_report(result: Result, command: str | None = None) -> str:
    head = [f"- {k}: {v}" for k, v in result.meta.items()]
    if command:
        head.insert(0, f"- command: `{command}`")
    head.append(f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}")
    return "\n".join([*head, "", format_table(result), "", "Bars:", "", *check_bars(result), ""])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--tasks", default=None, help="comma-separated T values (default 3,10,40)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 5)")
    p.add_argument("--rounds", type=int, default=None, help="repeat the method sequence, pool the steps")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    p.add_argument("--size", type=int, default=None, help="input height = width (default 64)")
    p.add_argument("--model", default=None, choices=["auto", "resnet18", "convnet"])
    p.add_argument("--width", type=int, default=None, help="ConvNet's first-block channels (default 32)")
    p.add_argument("--methods", default=None, help="comma-separated row keys (default: all); "
                   + ", ".join(m.key for m in methods()))
    p.add_argument("--quick", action="store_true",
                   help="the CPU preset: built-in ConvNet(32), batch 32 of 3x32x32, 3 warm-up steps "
                        "(explicit flags win)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("steps", "warmup", "rounds", "batch", "size", "model", "width"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.tasks is not None:
        values["tasks"] = tuple(int(t) for t in args.tasks.split(",") if t.strip())
    if args.methods is not None:
        values["methods"] = tuple(k.strip() for k in args.methods.split(",") if k.strip())
        select_methods(values["methods"])  # unknown keys fail here, before anything runs
    cfg = replace(Config(), device=args.device, seed=args.seed, **values)
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.rounds < 1 or not cfg.tasks or min(cfg.tasks) < 1:
        p.error("steps and rounds must be >= 1, warmup >= 0, and every T >= 1")
    return cfg, args


def report_main(argv: Sequence[str] | None, config: Any, out: str | None,
                run: Callable[..., Any], report: Callable[[Any, str], str]) -> int:
    """What every benchmark script's ``main`` does once its arguments are parsed: run, print the
    markdown report (with the command line that produced it), and write it to ``out`` if given.
    Progress goes to stderr."""
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = report(run(config, log=lambda s: print(s, file=sys.stderr, flush=True)), command)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return report_main(argv, config, args.out, run_benchmark, format_report)


if __name__ == "__main__":
    sys.exit(main())
