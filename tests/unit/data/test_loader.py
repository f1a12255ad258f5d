"""WindowLoader determinism and exact resume; eval windows cover every target once.

Run: .venv/bin/python -m pytest tests/unit/data/test_loader.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softmoe.data.loader import IGNORE_INDEX, WindowLoader, eval_batches, window_offsets

TOKENS = (np.arange(5000) * 7919 % 65521).astype(np.uint16)


def test_batch_shapes_dtypes_and_shift():
    idx_BT, targets_BT = WindowLoader(TOKENS, seq_len=16, batch_size=4, seed=0).batch(0)
    assert idx_BT.shape == targets_BT.shape == (4, 16)
    assert idx_BT.dtype == targets_BT.dtype == torch.int64
    assert torch.equal(idx_BT[:, 1:], targets_BT[:, :-1])


def test_batch_is_pure_function_of_seed_and_step():
    a, b = WindowLoader(TOKENS, 16, 4, seed=5), WindowLoader(TOKENS.copy(), 16, 4, seed=5)
    for step in (0, 1, 17, 10**12):
        assert all(torch.equal(x, y) for x, y in zip(a.batch(step), b.batch(step)))
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], WindowLoader(TOKENS, 16, 4, seed=6).batch(0)[0])


def test_resume_gives_the_same_batches():
    loader = WindowLoader(TOKENS, 8, 3, seed=1)
    run = [batch for _, batch in zip(range(10), loader.batches(0))]
    state = loader.state_dict(next_step=6)
    resumed_loader = WindowLoader(TOKENS, 8, 3, seed=1)
    start = resumed_loader.load_state_dict(state)
    resumed = [(s, i) for (s, i, _), _ in zip(resumed_loader.batches(start), range(4))]
    assert [s for s, _ in resumed] == [6, 7, 8, 9]
    assert all(torch.equal(i, run[s][1]) for s, i in resumed)


def test_load_state_rejects_other_settings():
    state = WindowLoader(TOKENS, 8, 3, seed=1).state_dict(4)
    with pytest.raises(ValueError, match="seed"):
        WindowLoader(TOKENS, 8, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        WindowLoader(TOKENS[:-1], 8, 3, seed=1).load_state_dict(state)


GOLDEN = [433, 899, 999, 556]


def test_window_offsets_golden_and_in_range():
    # Pinned: these offsets define every training run's data order, so they must never drift.
    assert window_offsets(0, 0, 4, 1000).tolist() == GOLDEN
    offs = window_offsets(123, 456, 10_000, 17)
    assert offs.min() >= 0 and offs.max() < 17 and len(np.unique(offs)) == 17


def test_windows_reach_the_last_token():
    tokens = np.arange(11, dtype=np.uint16)
    seen = torch.cat([WindowLoader(tokens, 10, 8, seed=0).batch(s)[1] for s in range(4)])
    assert seen.max().item() == 10  # the only window is tokens[0:11]


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("n", [9, 10, 11, 37, 64, 65])
def test_eval_batches_cover_each_target_once(n, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    seen = []
    for idx_BT, targets_BT in eval_batches(tokens, seq_len=8, batch_size=batch_size):
        assert idx_BT.shape == targets_BT.shape and idx_BT.shape[1] == 8 and idx_BT.shape[0] <= 3
        keep = targets_BT != IGNORE_INDEX
        assert torch.equal(targets_BT[keep], (idx_BT + 1)[keep])  # arange tokens: target = input + 1
        # inputs are never masked (a one-window last batch once aliased inputs and targets)
        assert torch.equal(idx_BT, idx_BT[:, :1] + torch.arange(8))
        seen += targets_BT[keep].tolist()
    assert sorted(seen) == list(range(1, n))


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    ({"seq_len": 0}, ValueError, "seq_len=0"),
    ({"batch_size": -1}, ValueError, "batch_size=-1"),
    ({"seed": -3}, ValueError, "seed=-3"),
    ({"seq_len": 5000}, ValueError, "seq_len=5000"),
    ({"tokens": [1, 2, 3]}, TypeError, "tokens"),
    ({"tokens": np.zeros((4, 4), np.uint16)}, TypeError, "tokens"),
])
def test_loader_rejects_bad_arguments(kwargs, err, match):
    args = {"tokens": TOKENS, "seq_len": 8, "batch_size": 2, "seed": 0} | kwargs
    with pytest.raises(err, match=match):
        WindowLoader(**args)
    with pytest.raises(ValueError, match="step=-1"):
        WindowLoader(TOKENS, 8, 2, 0).batch(-1)
