"""Explicit Euler for the heavy-ball ODE of NORMAL, read out at many times in one pass.

The system (NORMAL eq. 5) is

    dz/dt = -q,        dq/dt = -gamma q + g(z) + xi z,        z(0) = z0,  q(0) = q0.

One Euler step of signed size ``s`` from ``(z, q)`` is

    z' = z - s q,      q' = q + s (-gamma q + g(z) + xi z).

**Grid and read-out.**  Time is cut into a fixed grid of spacing ``h = step_size``: the points
``0, h, 2h, ...`` for positive positions and ``0, -h, -2h, ...`` for negative ones.  A position
``p`` with ``|p| = k h + r`` (``k`` an integer, ``0 <= r < h``) is reached by ``k`` full steps
along the grid and one final step of size ``sign(p) r`` that *branches off* the grid trajectory
(it does not move it).  So the number of Euler steps to reach ``p`` is ``ceil(|p| / h)``, and

* every task's read-out is the same function of its own position whether the tasks are read off
  one shared pass (:func:`integrate_positions` with ``shared_pass=True``: ``max_k`` grid steps per
  sign plus one branch step per task) or integrated one by one (``shared_pass=False``: ``k_t + 1``
  steps for task ``t``); the two give the same numbers, bit for bit on the CPU;
* equal positions give identical read-outs.

**Negative times.**  A negative position integrates the *same* ODE backwards in time from
``t = 0`` (Euler with negative steps ``-h``), i.e. ``z(p)`` for ``p < 0`` is the value at ``p`` of
the solution through ``(z0, q0)`` at ``t = 0``.  ``dz/dt = -q`` holds on both sides, so eq. (7)
applies unchanged.

Everything here is plain autograd (no position gradient); positions are given as Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["euler_step", "grid_split", "integrate_positions"]


def euler_step(
    z: Tensor, q: Tensor, s: float, field: Callable[[Tensor], Tensor], gamma: Tensor, xi: float
) -> tuple[Tensor, Tensor]:
    """One explicit Euler step of signed size ``s`` for NORMAL eq. (5).

    Example:
        >>> import torch
        >>> z, q = euler_step(torch.ones(1), torch.zeros(1), 0.5, lambda z: 2 * z,
        ...                   torch.tensor(0.5), 0.0)
        >>> z, q
        (tensor([1.]), tensor([1.]))
    """
    dq = field(z) - gamma * q
    if xi != 0.0:
        dq = dq + xi * z
    return z - s * q, q + s * dq


def grid_split(p: float, step_size: float) -> tuple[int, float]:
    """``|p| = k h + r`` with integer ``k >= 0`` and ``0 <= r < h`` (robust to rounding).

    Example:
        >>> grid_split(-0.25, 0.1)
        (2, 0.04999999999999999)
    """
    a = abs(p)
    k = int(math.floor(a / step_size))
    r = a - k * step_size
    while r < 0.0 and k > 0:
        k -= 1
        r = a - k * step_size
    while r >= step_size:
        k += 1
        r = a - k * step_size
    return k, max(r, 0.0)


def integrate_positions(
    z0: Tensor,
    q0: Tensor,
    positions: Sequence[float],
    step_size: float,
    field: Callable[[Tensor], Tensor],
    gamma: Tensor,
    xi: float = 0.0,
    *,
    shared_pass: bool = True,
    max_steps: int = 10_000,
) -> list[tuple[Tensor, Tensor]]:
    """``(z(p_t), q(p_t))`` for every position, in the order given (see the module docstring).

    Args:
        z0, q0: the initial state and velocity (same shape).
        positions: one float per task; any real number.
        step_size: the grid spacing ``h > 0``.
        field: ``g`` in eq. (5), a map ``z -> g(z)`` of the same shape.
        gamma: the damping ``gamma`` (a tensor, so that it is learnable).
        xi: the skip coefficient ``xi``.
        shared_pass: read every position off one pass per sign (sorted by ``|p|``) instead of
            integrating each task from 0 on its own.
        max_steps: the largest grid index ``k`` allowed; a position further out is an error
            (it usually means the positions' step size is too large).

    Example:
        >>> import torch
        >>> out = integrate_positions(torch.ones(2), torch.zeros(2), [0.3, -0.1, 0.3], 0.1,
        ...                           lambda z: -z, torch.tensor(0.5))
        >>> len(out), torch.equal(out[0][0], out[2][0])
        (3, True)
    """
    if not step_size > 0.0 or not math.isfinite(step_size):
        raise ValueError(f"step_size must be a positive finite number, got {step_size}")
    if z0.shape != q0.shape:
        raise ValueError(f"z(0) has shape {tuple(z0.shape)} but q(0) has shape {tuple(q0.shape)}")
    splits = []
    for t, p in enumerate(positions):
        if not math.isfinite(p):
            raise ValueError(f"the position of task {t} is not finite ({p})")
        k, r = grid_split(p, step_size)
        if k > max_steps:
            raise ValueError(
                f"the position of task {t} ({p:.4g}) needs {k} Euler steps of size {step_size}, "
                f"more than max_steps={max_steps}; lower the positions' step size or raise max_steps"
            )
        splits.append((1.0 if p >= 0 else -1.0, k, r))

    out: list[tuple[Tensor, Tensor] | None] = [None] * len(splits)

    def branch(z: Tensor, q: Tensor, sign: float, r: float) -> tuple[Tensor, Tensor]:
        return (z, q) if r == 0.0 else euler_step(z, q, sign * r, field, gamma, xi)

    if not shared_pass:
        for t, (sign, k, r) in enumerate(splits):
            z, q = z0, q0
            for _ in range(k):
                z, q = euler_step(z, q, sign * step_size, field, gamma, xi)
            out[t] = branch(z, q, sign, r)
        return out  # type: ignore[return-value]

    for sign in (1.0, -1.0):
        tasks = sorted((t for t, s in enumerate(splits) if s[0] == sign), key=lambda t: splits[t][1:])
        z, q, k_now = z0, q0, 0
        for t in tasks:
            _, k, r = splits[t]
            while k_now < k:
                z, q = euler_step(z, q, sign * step_size, field, gamma, xi)
                k_now += 1
            out[t] = branch(z, q, sign, r)
    return out  # type: ignore[return-value]
