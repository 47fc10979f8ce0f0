"""The small multi-task model and data shared by the optimizer-level tests (AMP, checkpoints,
distributed training, faults, the optimizer)."""

from __future__ import annotations

import torch
from torch import nn

T = 3  # tasks


class Net(nn.Module):
    """A shared tanh MLP encoder (5 -> 8 -> 6) and one linear head per task (T by default)."""

    def __init__(self, tasks: int = T) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(tasks)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]


def data(step: int, device: str = "cpu", *, rows: int = 16, seed_offset: int = 0,
         shift: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded regression batch for ``Net``: x [rows, 5] and T targets [rows, 1]; target t has
    scale t + 1 and mean ``shift``."""
    g = torch.Generator().manual_seed(seed_offset + step)
    x = torch.randn(rows, 5, generator=g)
    ys = [torch.randn(rows, 1, generator=g) * (t + 1) + shift for t in range(T)]
    return x.to(device), [y.to(device) for y in ys]
