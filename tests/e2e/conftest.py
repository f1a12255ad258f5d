"""The Trainer sets torch's thread count from the preset (process-wide); give it back after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
