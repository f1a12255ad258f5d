"""Run a function on N processes (forked from a forkserver) that join one gloo process group, as torchrun
would start them.

    results = run_ranks(fn, 2, arg1, ...)   # fn(rank, world_size, *args) in each process; returns its results

The environment is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so code under test
joins the group exactly as it does under torchrun (`softmoe.parallel.world.init_world`). A rank's
exception fails the call with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch

__all__ = ["run_ranks", "free_port"]

# forkserver: children fork from one clean, single-threaded server process that imported torch and softmoe
# once (a spawned child spends seconds importing them on a busy 2-core box; forking pytest itself would copy
# its threads' state, e.g. pytest-xdist's). Each child sets one intra-op thread before any torch op.
START_METHOD = "forkserver"
PRELOAD = ["torch", "torch.distributed", "softmoe.parallel.trainer", "softmoe.parallel.checkpoint"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    path = Path(out) / f"rank{rank}.pt"
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure to the parent, then stop this rank
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on `world_size` spawned processes; their return values by rank."""
    ctx = mp.get_context(START_METHOD)
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first call)
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, out, args))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for rank in range(world_size):
            path = Path(out) / f"rank{rank}.pt"
            if not path.is_file():
                raise RuntimeError(f"rank {rank} of {world_size} wrote no result (timeout {timeout}s or crash; "
                                   f"exit code {procs[rank].exitcode})")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{record['error']}")
            results.append(record["result"])
        return results
