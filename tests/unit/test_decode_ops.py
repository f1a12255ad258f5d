"""benchmarks/decode_ops.py arrives working: it counts operators and host reads exactly (no timing)."""

from __future__ import annotations

import torch


def test_counters_see_operators_and_host_reads():
    from benchmarks.decode_ops import OpCounter
    from tests.reference.sync_counter import SyncCounter

    with SyncCounter(stacks=True) as syncs, OpCounter() as ops:
        x = torch.ones(3) + 1          # one operator
        bool(x.sum() > 0)              # sum, gt, and a host read (_local_scalar_dense)
        torch.nonzero(x)               # a host read (its size)
        x.tolist()                     # a host read without an operator
    assert ops.total >= 5 and syncs.ops == ["_local_scalar_dense", "nonzero", "tolist"]
    assert len(syncs.stacks) == 3 and all(any(f.filename == __file__ for f in s) for s in syncs.stacks)


def test_quick_run_prints_every_variant(capsys):
    from benchmarks.decode_ops import main

    assert main(["--quick", "--sites", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"softmoe", "top1", "top2", "dense"} <= set(rows)
    ops = {name: int(rows[name].split("|")[2]) for name in ("softmoe", "top2", "dense")}
    assert ops["dense"] < ops["top2"] < ops["softmoe"]  # routing dispatches operators a dense FFN does not
