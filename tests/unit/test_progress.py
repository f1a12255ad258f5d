"""Progress bars: drawn on a terminal, silent in pipes and with --quiet; eval batch counts are exact.

Run: .venv/bin/python -m pytest -q tests/unit/test_progress.py
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from softmoe.data import eval_batches
from softmoe.data.loader import num_eval_batches
from softmoe.common.progress import progress_bar


@pytest.mark.parametrize("n, seq_len, batch_size", [(100, 8, 3), (97, 8, 4), (9, 8, 1), (1000, 32, 16), (33, 32, 2)])
def test_num_eval_batches_matches_the_iterator(n, seq_len, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    assert num_eval_batches(n, seq_len, batch_size) == sum(1 for _ in eval_batches(tokens, seq_len, batch_size))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, enabled, drawn", [(_Terminal(), True, True), (_Terminal(), False, False),
                                                    (io.StringIO(), True, False)])
def test_bar_only_on_a_terminal_and_not_quiet(monkeypatch, stream, enabled, drawn):
    monkeypatch.setattr("sys.stderr", stream)
    bar = progress_bar(3, "scoring", enabled)
    bar.update(3)
    bar.close()
    assert ("scoring" in stream.getvalue()) == drawn
