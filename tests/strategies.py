"""Hypothesis strategies for task Jacobians with controlled structure."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

KINDS = ("random", "rank1", "low_rank", "duplicate", "colinear", "opposite", "zero_row", "orthogonal")


@st.composite
def jacobians(draw, min_tasks: int = 2, max_tasks: int = 8, max_dim: int = 12,
              min_log_scale: float = -8, max_log_scale: float = 8, kinds=KINDS) -> torch.Tensor:
    """A float64 [T, D] matrix of one of several hard structures, times 10**s."""
    T = draw(st.integers(min_tasks, max_tasks))
    D = draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.floats(min_log_scale, max_log_scale))
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((T, D))
    if kind == "rank1":
        J = rng.standard_normal((T, 1)) * rng.standard_normal((1, D))
    elif kind == "low_rank":
        r = max(1, min(T, D) // 2)
        J = rng.standard_normal((T, r)) @ rng.standard_normal((r, D))
    elif kind == "duplicate":
        J[-1] = J[0]
    elif kind == "colinear":
        J[-1] = 3.7 * J[0]
    elif kind == "opposite":
        J[-1] = -J[0]
    elif kind == "zero_row":
        J[rng.integers(T)] = 0.0
    elif kind == "orthogonal" and D >= T:
        q, _ = np.linalg.qr(rng.standard_normal((D, T)))
        J = q.T * rng.uniform(0.1, 10, size=(T, 1))
    return torch.tensor(J * scale, dtype=torch.float64)
