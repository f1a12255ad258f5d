"""The test harness `run_ranks` itself: a rank's failure and a rank that hangs are reported, never waited on."""

from __future__ import annotations

import time

import pytest

from tests.unit.parallel.spawn import run_ranks


def _returns_rank(rank: int, world_size: int) -> int:
    return rank * 10 + world_size


def _rank1_fails(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one says no")


def _rank0_fails_rank1_hangs(rank: int, world_size: int) -> int:
    if rank == 0:
        raise ValueError("rank zero gave up")
    time.sleep(600)  # as a peer waits forever in a collective for a rank that left
    return rank


def test_results_by_rank():
    assert run_ranks(_returns_rank, 2) == [2, 12]


def test_a_failing_rank_names_its_error():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*rank one says no"):
        run_ranks(_rank1_fails, 2)


def test_a_hanging_rank_is_killed_and_shown_after_its_peers_failure():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_ranks(_rank0_fails_rank1_hangs, 2, timeout=20)
    message = str(info.value)
    assert time.monotonic() - start < 120  # killed, not waited for
    assert message.index("rank 0 of 2 failed") < message.index("ranks [1] of 2 still ran after 20s")
    assert "rank zero gave up" in message and "in _rank0_fails_rank1_hangs" in message  # its error, its stack
