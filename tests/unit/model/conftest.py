"""Model tests run tiny matmuls: one intra-op thread is several times faster than two on a busy CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
