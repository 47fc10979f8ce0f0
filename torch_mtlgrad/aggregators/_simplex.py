"""Per-task weights kept on the simplex between calls, under ``present=`` (absent tasks).

One rule for every method whose state is a ``lambda`` on the simplex (MoCo, MoDo): the call runs
on the present tasks' ``lambda`` renormalised to sum 1 (uniform where their share is 0) and the
new values are scaled back by that share, so the absent tasks keep theirs and the whole stays on
the simplex; before the first call ``lambda`` is ``1/T`` for every task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SimplexState"]


class SimplexState:
    """Mixin for an aggregator whose state ``self.lam`` (``[T]`` or ``None``: ``1/T`` each) lies
    on the simplex, under ``present=``: the call runs on the present tasks' ``lambda``
    renormalised to sum 1 (uniform where their share is 0), and the new values are scaled back by
    that share, so the absent tasks keep theirs and the whole stays on the simplex."""

    lam: Tensor | None

    def _restrict(self, idx: Tensor, num_tasks: int) -> dict[str, Any]:
        saved = super()._restrict(idx, num_tasks)  # type: ignore[misc]
        full = self.lam
        saved["lam"], saved["mass"] = full, None
        if full is not None:
            lam = full[idx.to(full.device)]
            mass = lam.sum()
            saved["mass"] = mass
            self.lam = torch.where(mass > 0, lam / mass.clamp_min(torch.finfo(lam.dtype).tiny),
                                   torch.full_like(lam, 1.0 / idx.numel()))
        return saved

    def _unrestrict(self, saved: dict[str, Any]) -> None:
        super()._unrestrict(saved)  # type: ignore[misc]
        self.lam = saved["lam"]

    def _scatter(self, saved: dict[str, Any], idx: Tensor, num_tasks: int) -> None:
        super()._scatter(saved, idx, num_tasks)  # type: ignore[misc]
        new, full, mass = self.lam, saved["lam"], saved["mass"]
        if new is None:
            self.lam = full
            return
        if full is None:  # the initial lambda: 1/T for every task
            full = new.new_full((num_tasks,), 1.0 / num_tasks)
            mass = new.new_tensor(idx.numel() / num_tasks)
        full = full.to(new)
        self.lam = full.index_copy(0, idx.to(new.device), new * mass.to(new))

    def _known_num_tasks(self) -> int | None:
        return None if self.lam is None else int(self.lam.shape[0])
