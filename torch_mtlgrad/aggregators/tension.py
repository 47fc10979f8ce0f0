"""Task tensioners on any base direction.

Nakamura, Grassi and Wolf, *Leveraging convergence behavior to balance conflicting tasks in
multi-task learning*, arXiv:2204.06698 (2022), eq. 5-8 and Algorithms 1-2 (the "tensioner
paper" of this package's docstrings).

Given the base direction ``v`` (the paper's are min-norm and central; any aggregator works):

* ``zeta_m(t)`` = mean of ``||g_m||`` over the last ``window`` steps (the paper's T = 10), eq. 6's
  history; the window slides by one step per call.
* ``delta_m = zeta_m(t) / zeta_m(t-1) + log10(L_m)``                                   (eq. 6)
* ``c_m = alpha / (1 + exp(-e delta_m + e)) + 1 - alpha``, clamped at >= 0              (eq. 7)
* ``u_m = c_m (g_m - v) / ||g_m - v||`` (zero where ``g_m = v``)                        (eq. 5)
* ``v_n = v + sum_m u_m`` subject to ``g_m . v_n >= 0`` for every task                  (eq. 8)

The first ``window`` calls return ``v`` unchanged; call ``window + 1`` is the first tensioned one,
when ``zeta(t)`` and ``zeta(t-1)`` are both means over full windows (Algorithm 1, line 8).

Choices the paper leaves open, and the ones made here:

* ``alpha = 0`` returns ``v`` exactly, as the paper states.  (Eq. 7 gives ``c_m = 1`` there; the
  unit tensions then cancel for two tasks whenever ``v`` lies between ``g_1`` and ``g_2``, but not
  in general, so ``alpha = 0`` is handled as "no tension" explicitly.)
* Feasibility, ``feasibility=``: ``"project"`` (default) is the minimal-change projection of
  ``v_n`` onto ``{d : J d >= 0}`` (through the dual over ``G``, the solver UPGrad shares);
  ``"segment"`` is the authors' fix: for each task in order whose constraint fails, move ``v_n``
  to where the segment from ``g_m`` to ``v_n`` crosses ``g_m . d = 0``; if a constraint still
  fails after the pass (possible for T > 2), finish with the projection.
* ``scale="unit"`` (default, the paper's) adds unit-length tensions whatever the gradients'
  scale; ``scale="relative"`` multiplies them by ``||v||`` so the correction follows the scale of
  the base direction.
* A previous window mean of zero (all gradients zero for ``window`` steps) gives ratio 1.
* With ``loss_term=True`` the losses must be positive; a non-positive loss is an error naming the
  task.  ``loss_term=False`` drops the ``log10`` term.

Everything after the base direction is computed in the row space from ``G`` and ``J v``: the
result is ``d = beta v + omega^T J`` with one final pass over ``J``.

Absent tasks (``present=``): the base method runs on the present rows (with its own rule for
absent tasks), and the tensioner on them too.  An absent task's window of gradient norms does not
slide; each task counts its own present steps, and a task with fewer than ``window + 1`` of them
(e.g. one first present late) pulls with ``c_m = 0`` (as every task does in the first ``window``
calls) while its constraint ``g_m . d >= 0`` still holds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from ..diagnostics import angles_to
from ._base import Aggregator
from ._solvers import dual_cone_weights, dual_cone_weights_pgd

__all__ = ["Tensioned", "tension_factors"]

Feasibility = Literal["project", "segment"]
Scale = Literal["unit", "relative"]


def tension_factors(delta: Tensor, alpha: float) -> Tensor:
    """``c_m = alpha / (1 + exp(-e delta_m + e)) + 1 - alpha`` clamped at 0 (eq. 7).

    Example:
        >>> tension_factors(torch.tensor([1.0]), 0.3)   # delta = 1 -> alpha/2 + 1 - alpha
        tensor([0.8500])
    """
    e = math.e
    return (alpha * torch.sigmoid(e * delta - e) + 1 - alpha).clamp_min(0)


class Tensioned(Aggregator):
    """Wrap a base aggregator with task tensioners (tensioner paper eq. 5-8).

    Args:
        base: the aggregator that gives ``v`` (e.g. :class:`Central` or :class:`MinNorm`).
        alpha: tension sensitivity in [0, 1] (eq. 7), default 0.3 as in the paper.
        window: length of the gradient-norm history (the paper's T = 10).
        loss_term: include ``log10(L_m)`` in ``delta_m`` (eq. 6); needs positive losses.
        feasibility: ``"project"`` (default) or ``"segment"`` (the authors' fix); see module doc.
        scale: ``"unit"`` (default, the paper's) or ``"relative"`` (tensions times ``||v||``).
        solver: the projection's dual solver: ``"exact"`` (default; active set in float64 on the
            CPU, run only when a constraint fails, so it synchronises) or ``"pgd"`` (``solver_iters``
            fixed projected-gradient steps on the device, always run; approximate, sync-free).
        check_losses: with ``loss_term``, raise on a non-positive loss (synchronises).  With
            ``False`` a non-positive loss is clamped to the smallest positive float (a very
            negative log term, so no pull toward that task) and nothing synchronises.
        solver_iters: iterations of the ``"pgd"`` solver.

    Diagnostics of the last call (``agg.diagnostics``): ``c``, ``delta`` (NaN during warm-up),
    ``angle_base`` and ``angle`` (degrees between each ``g_m`` and ``v`` / the final direction),
    ``tensioned`` (1.0 when the tension applied).

    Example:
        >>> import torch
        >>> from torch_mtlgrad.aggregators import Central
        >>> agg = Tensioned(Central(), alpha=0.3, window=2)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
        >>> for loss in ([0.5, 2.0], [0.5, 2.0], [0.4, 3.0]):
        ...     d = agg(J, torch.tensor(loss))
        >>> bool((J @ d >= 0).all())
        True
    """

    paper = ("Nakamura, Grassi & Wolf, *Leveraging convergence behavior to balance conflicting "
             "tasks in multi-task learning*, arXiv 2022, eq. 5-8, Alg. 1-2")
    summary = ("task tensioners pull any gradient aggregator's direction toward diverging tasks; "
               "feasibility `g_m . d >= 0` for every task by projection or the authors' segment "
               "fix")

    stateful = True

    def __init__(self, base: Aggregator, alpha: float = 0.3, window: int = 10,
                 loss_term: bool = True, feasibility: Feasibility = "project",
                 scale: Scale = "unit", solver: str = "exact", check_losses: bool = True,
                 solver_iters: int = 200) -> None:
        super().__init__()
        if not isinstance(base, Aggregator):
            raise TypeError(f"base must be an Aggregator, got {type(base).__name__}")
        if isinstance(base, Tensioned):
            raise ValueError("base is already tensioned")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if feasibility not in ("project", "segment"):
            raise ValueError(f"feasibility must be 'project' or 'segment', got {feasibility!r}")
        if scale not in ("unit", "relative"):
            raise ValueError(f"scale must be 'unit' or 'relative', got {scale!r}")
        if solver not in ("exact", "pgd"):
            raise ValueError(f"solver must be 'exact' or 'pgd', got {solver!r}")
        self.base = base
        self.alpha = float(alpha)
        self.window = window
        self.loss_term = loss_term
        self.feasibility = feasibility
        self.scale = scale
        self.solver = solver
        self.check_losses = check_losses
        self.solver_iters = solver_iters
        self.history: Tensor | None = None  # [window + 1, T] gradient norms, oldest first
        self.count = 0  # calls recorded so far
        # Present steps recorded per task ([T] int64, CPU) once tasks were absent; None: every
        # task was recorded at each of the ``count`` calls.
        self.task_count: Tensor | None = None

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.loss_term or bool(getattr(self.base, "needs_losses", False))

    # ---------------------------------------------------------------------------------------
    def _validate(self, J: Tensor, losses: Tensor | None) -> None:
        T = J.shape[0]
        if self.history is not None and self.history.shape[1] != T:
            raise ValueError(
                f"Tensioned was tracking {self.history.shape[1]} tasks, got J with {T} rows; "
                "call reset() to start over with a different number of tasks"
            )
        if self.loss_term:
            if losses is None:
                raise ValueError("Tensioned with loss_term=True needs the loss values: agg(J, losses)")
            if not self.check_losses:
                return
            bad = (~(losses > 0)).nonzero().flatten()
            if bad.numel():
                t = int(bad[0])
                raise ValueError(
                    f"task {self._task_index(t)} has loss {float(losses[t])!r}: the tensioner's "
                    "log10(L) term needs positive losses; pass None for a task that is absent "
                    "this step, or loss_term=False to drop the term"
                )

    def forward(self, J: Tensor, losses: Tensor | None) -> Tensor:
        self._validate(J, losses)
        v = self.base(J, losses)
        T = J.shape[0]
        G = J @ J.T
        norms = torch.diagonal(G).clamp_min(0).sqrt()
        self._record(norms)
        Jv = J @ v
        vv = v @ v
        base_w = self.base.weights
        nan = torch.full_like(norms, float("nan"))
        ready: Tensor | None = None  # per task: its window is full (only once tasks were absent)
        if self.task_count is None:
            warm_up = self.count <= self.window
        else:
            ready = self.task_count > self.window
            warm_up = not bool(ready.any())
            if bool(ready.all()):
                ready = None
        if self.alpha == 0.0 or warm_up:
            self.weights = base_w
            c = torch.zeros_like(norms)
            self.diagnostics = self._diag(c, nan, norms, Jv, vv, Jv, vv, tensioned=False)
            return v
        assert self.history is not None
        zeta_t = self.history[1:].mean(0)
        zeta_prev = self.history[:-1].mean(0)
        ratio = torch.where(zeta_prev > 0, zeta_t / zeta_prev.clamp_min(torch.finfo(J.dtype).tiny),
                            torch.ones_like(zeta_t))
        if self.loss_term:
            assert losses is not None
            delta = ratio + torch.log10(losses.clamp_min(torch.finfo(losses.dtype).tiny))
        else:
            delta = ratio
        c = tension_factors(delta, self.alpha)
        if ready is not None:  # tasks still filling their window pull with c = 0
            r = ready.to(c.device)
            c = torch.where(r, c, torch.zeros_like(c))
            delta = torch.where(r, delta, torch.full_like(delta, float("nan")))
        diag = torch.diagonal(G)
        diff_sq = (diag - 2 * Jv + vv).clamp_min(0)
        eps = torch.finfo(J.dtype).eps
        diff_n = diff_sq.sqrt()
        # g_m = v up to rounding: rounding is relative to the largest vector around, not to g_m
        # (a zero row against a numerically zero v would otherwise get a huge unit vector).
        keep = diff_sq > 16 * eps * (diag.amax() + vv)
        a = torch.where(keep, c / diff_n.clamp_min(torch.finfo(J.dtype).tiny), torch.zeros_like(c))
        if self.scale == "relative":
            a = a * vv.sqrt()
        # v_n = beta v + omega^T J, tracked in the row space: J v_n = beta Jv + G omega.
        beta = 1 - a.sum()
        omega = a
        Jvn = beta * Jv + G @ omega
        if self.feasibility == "segment":
            for m in range(T):
                gm2 = diag[m]
                bm = Jvn[m]
                fire = bm < 0
                s = torch.where(fire, gm2 / (gm2 - bm).clamp_min(torch.finfo(J.dtype).tiny),
                                torch.ones_like(bm))
                beta = s * beta
                omega = s * omega
                omega[m] = omega[m] + (1 - s)
                Jvn = s * Jvn + (1 - s) * G[:, m]
        if self.solver == "pgd":
            lam = dual_cone_weights_pgd(G, Jvn, self.solver_iters)
            omega = omega + lam
            Jvn = Jvn + G @ lam
        else:
            tol = 1e2 * eps * norms * (beta.abs() * vv.sqrt() + omega.abs() @ norms)
            if bool((Jvn < -tol).any()):
                lam = dual_cone_weights(G, Jvn)
                omega = omega + lam
                Jvn = Jvn + G @ lam
        d = beta * v + omega @ J
        self.weights = beta * base_w + omega if base_w is not None else None
        dd = d @ d
        self.diagnostics = self._diag(c, delta, norms, Jv, vv, Jvn, dd, tensioned=True)
        return d

    def _record(self, norms: Tensor) -> None:
        if self.history is None:
            self.history = torch.zeros(self.window + 1, norms.shape[0], dtype=norms.dtype,
                                       device=norms.device)
        h = torch.roll(self.history.to(norms.dtype), -1, dims=0)
        h[-1] = norms
        self.history = h
        self.count += 1
        if self.task_count is not None:
            self.task_count = self.task_count + 1

    @staticmethod
    def _diag(c: Tensor, delta: Tensor, norms: Tensor, Jv: Tensor, vv: Tensor, Jd: Tensor,
              dd: Tensor, tensioned: bool) -> dict[str, Tensor]:
        return {
            "c": c,
            "delta": delta,
            "angle_base": angles_to(Jv, norms, vv.sqrt()),
            "angle": angles_to(Jd, norms, dd.sqrt()),
            "tensioned": torch.tensor(float(tensioned)),
        }

    # Absent tasks ----------------------------------------------------------------------------
    def _task_state(self) -> dict[str, tuple[tuple[int, ...], float]]:
        return {"history": ((1,), 0.0)}

    def _known_num_tasks(self) -> int | None:
        own = super()._known_num_tasks()
        return own if own is not None else self.base._known_num_tasks()

    def _restrict(self, idx: Tensor, num_tasks: int) -> dict[str, Any]:
        saved = super()._restrict(idx, num_tasks)
        saved["task_count"] = self.task_count
        saved["base_saved"] = self.base._restrict(idx, num_tasks)
        full = self.task_count
        self.task_count = (full if full is not None else
                           torch.full((num_tasks,), self.count if self.history is not None else 0,
                                      dtype=torch.int64))[idx.cpu()]
        return saved

    def _unrestrict(self, saved: dict[str, Any]) -> None:
        super()._unrestrict(saved)
        self.task_count = saved["task_count"]
        self.base._unrestrict(saved["base_saved"])

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        sub = self.task_count
        assert sub is not None
        super()._scatter(saved, idx, num_tasks)
        self.base._scatter(saved["base_saved"], idx, num_tasks)
        full = saved["task_count"]
        # count was advanced by this call: the absent tasks are one step behind it now.
        if full is None:  # every task was at the previous call count
            full = torch.full((num_tasks,), self.count - 1, dtype=torch.int64)
        full = full.index_copy(0, idx.cpu(), sub)
        self.task_count = None if bool((full == self.count).all()) else full

    # State -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = {
            "history": None if self.history is None else self.history.clone(),
            "count": self.count,
            "base": self.base.state_dict(),
        }
        if self.task_count is not None:
            out["task_count"] = self.task_count.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hist = state.get("history")
        if hist is not None and (not isinstance(hist, Tensor) or hist.dim() != 2
                                 or hist.shape[0] != self.window + 1):
            raise ValueError(
                f"tensioner history must be a tensor of shape [{self.window + 1}, T] for "
                f"window={self.window}, got {getattr(hist, 'shape', type(hist).__name__)}"
            )
        if hist is not None and not bool(((hist >= 0) & torch.isfinite(hist)).all()):
            raise ValueError("tensioner history holds negative or non-finite gradient norms")
        count = state.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"tensioner count must be a non-negative integer, got {count!r}")
        tc = state.get("task_count")
        if tc is not None and (not isinstance(tc, Tensor) or tc.dim() != 1 or hist is None
                               or tc.shape[0] != hist.shape[1]):
            raise ValueError("tensioner task_count must be a [T] tensor matching the history")
        self.base.load_state_dict(state.get("base", {}))
        self.history = None if hist is None else hist.clone()
        self.count = count
        self.task_count = None if tc is None else tc.detach().to("cpu", torch.int64).clone()

    def reset(self) -> None:
        self.history = None
        self.count = 0
        self.task_count = None
        self.base.reset()

    @property
    def runs_on_features(self) -> bool:
        """As its base method (the tensioner reads only ``G``, the losses and the base weights)."""
        return self.base.runs_on_features

    def __repr__(self) -> str:
        return f"Tensioned({self.base!r}, alpha={self.alpha}, window={self.window})"
