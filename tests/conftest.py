"""Shared pytest setup.

Run the whole suite: make test   (or .venv/bin/python -m pytest -q -n 2)
"""

from __future__ import annotations

import os

import torch

# Under pytest-xdist every worker is its own process: one intra-op thread each avoids
# oversubscribing the cores (2 workers x N threads) and keeps timings of the suite predictable.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
