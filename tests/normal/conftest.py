import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The NORMAL tests use tiny tensors: one intra-op thread is much faster on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
