"""Training steps with SDMGrad and ExcessMTL read no value on the host (their docstrings' claim:
no host synchronisation), with the CPU stand-in for CUDA's sync debug mode of
``tests/test_capture.py``, in the loop and feature captures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer
from torch_mtlgrad.aggregators import get

from ..test_capture import ConvNet, batch, forbid_host_sync, params


@pytest.mark.parametrize("name", ["sdmgrad", "excessmtl"])
@pytest.mark.parametrize("capture", ["loop", "feature"])
def test_steps_are_sync_free(name: str, capture: str) -> None:
    torch.manual_seed(0)
    model = ConvNet(3)
    opt = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), shared=model.encoder,
                             aggregator=get(name), capture=capture, nonfinite="unchecked")
    x, ys = batch(0)
    for _ in range(3):
        opt.zero_grad()
        z = model.encoder(x)
        losses = [nn.functional.mse_loss(h(z), y) for h, y in zip(model.heads, ys[:3])]
        with forbid_host_sync():
            opt.backward(losses, features=z if capture == "feature" else None)
            opt.step()
    assert bool(torch.isfinite(params(model)).all())
