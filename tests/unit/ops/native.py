"""Test helper: the C loop of the CPU soft top-k (softmoe/ops/lapsum_native.py), required where a C compiler exists."""

from __future__ import annotations

import os
import shutil

import pytest

from softmoe.ops import lapsum_native


def require_native():
    """The loaded library; a skip only where no C compiler is installed (a failing build fails the test)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the C loop of the CPU soft top-k cannot be built here")
    lib = lapsum_native.library()
    assert lib is not None, "a C compiler is installed but softmoe/ops/lapsum_cpu.c did not build (see the warning)"
    return lib
