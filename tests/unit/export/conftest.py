"""Export tests run tiny matmuls: every test here uses one intra-op thread (see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_for_model_tests(one_thread):
    yield
