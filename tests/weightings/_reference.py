"""Float64 numpy references of the optimizers the weightings use (independent of torch.optim)."""

from __future__ import annotations

import numpy as np


class SGD:
    """x <- x - lr (g + wd x)."""

    def __init__(self, x: np.ndarray, lr: float, wd: float = 0.0) -> None:
        self.x, self.lr, self.wd = x.astype(np.float64).copy(), lr, wd

    def step(self, g: np.ndarray) -> None:
        self.x = self.x - self.lr * (g + self.wd * self.x)


class Adam:
    """Kingma and Ba's Adam with L2 decay added to the gradient (betas 0.9, 0.999, eps 1e-8)."""

    def __init__(self, x: np.ndarray, lr: float, wd: float = 0.0) -> None:
        self.x, self.lr, self.wd = x.astype(np.float64).copy(), lr, wd
        self.m = np.zeros_like(self.x)
        self.v = np.zeros_like(self.x)
        self.t = 0

    def step(self, g: np.ndarray) -> None:
        g = g + self.wd * self.x
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        self.x = self.x - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def make(name: str, x: np.ndarray, lr: float, wd: float = 0.0) -> SGD | Adam:
    return Adam(x, lr, wd) if name == "adam" else SGD(x, lr, wd)
