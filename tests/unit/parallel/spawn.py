"""Run a function on N processes (forked from a forkserver) that join one gloo process group, as torchrun
would start them.

    results = run_ranks(fn, 2, arg1, ...)   # fn(rank, world_size, *args) in each process; returns its results

The environment is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so code under test
joins the group exactly as it does under torchrun (`softmoe.parallel.world.init_world`). A rank's
exception fails the call with that rank's traceback; a rank still running at the timeout fails it with the
Python stacks of the ranks that hang (faulthandler, on SIGUSR1) and is killed.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
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
    stacks = open(Path(out) / f"rank{rank}.stacks", "w")  # noqa: SIM115 (open while the rank lives)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
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


def _stacks(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    return text or "(no stacks: the rank had not started, so SIGUSR1 ended it)\n"


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
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in hung:
            os.kill(procs[rank].pid, signal.SIGUSR1)
        time.sleep(1 if hung else 0)  # the stacks reach their files
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        records = {rank: torch.load(path, weights_only=False) for rank in range(world_size)
                   if (path := Path(out) / f"rank{rank}.pt").is_file()}
        failures = "".join(f"rank {rank} of {world_size} failed:\n{record['error']}\n"
                           for rank, record in records.items() if not record["ok"])
        if hung:  # a peer's failure first: it is the usual reason a rank waits forever in a collective
            stacks = "\n".join(f"rank {rank}:\n{_stacks(Path(out) / f'rank{rank}.stacks')}" for rank in hung)
            raise RuntimeError(f"{failures}ranks {hung} of {world_size} still ran after {timeout}s; their "
                               f"stacks:\n{stacks}")
        if failures:
            raise RuntimeError(failures)
        missing = [rank for rank in range(world_size) if rank not in records]
        if missing:
            raise RuntimeError(f"ranks {missing} of {world_size} wrote no result (exit codes "
                               f"{[procs[rank].exitcode for rank in missing]})")
        results = [records[rank]["result"] for rank in range(world_size)]
        return results
