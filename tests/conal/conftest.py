"""Run the CoNAL tests single-threaded: they use tiny tensors, and on a shared machine intra-op
threads spin-wait far longer than the work itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
