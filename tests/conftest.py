"""Shared pytest setup.

Run the whole suite: make test   (or .venv/bin/python -m pytest -q -n 2)
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in triton's CPU interpreter (tests/unit/ops/test_lapsum_triton.py). triton reads
# the variable when it is first imported (its own library functions are decorated then), before any test module
# is collected; it changes nothing else here (no other code runs Triton kernels on CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker is its own process: one intra-op thread each avoids
# oversubscribing the cores (2 workers x N threads) and keeps timings of the suite predictable.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: tiny matmuls only pay sync overhead with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
