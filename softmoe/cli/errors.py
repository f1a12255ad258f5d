"""How every command reports a user's mistake: one line on stderr, `softmoe <command>: <why>`, and exit status 2.

A command raises `UserError` (or lets `user_errors(...)` turn the library's own exceptions into one) and
`run_command` reports it; a command that can be continued (`main`, `compare`: `resumable`) says so on Ctrl-C and
exits 130; a missing optional dependency exits 1 naming the extra that installs it.

Under torchrun (`python -m softmoe.train` on several ranks) the line goes to the rank's error file
(TORCHELASTIC_ERROR_FILE), which torchrun prints as the failure's "traceback" in the summary that ends its own
output, so it is said once, last, instead of before torchrun's ~40 lines. An error that every rank meets alike
(`every_rank`: the command line, the config, the data, or rank 0's error raised on every rank) is reported by
rank 0; the other ranks exit 0, so torchrun does not stop rank 0 before it has written it. Having reported,
a rank under torchrun exits without Python's teardown (`exit_without_teardown`: torch's gloo teardown can
deadlock after a failed start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["UserError", "as_typed", "check_out_dir", "exit_without_teardown", "fail", "run_command", "user_errors"]


class UserError(Exception):
    """A mistake of the user's (a flag, a config, a path, missing data): reported in one line, exit 2.

    every_rank: under torchrun, every rank meets the error alike, so rank 0 alone reports it."""

    def __init__(self, message: str, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException], prefix: str = "", flags: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the exceptions `kinds` raised inside the block into a UserError ("<prefix><the error>"); an error that
    carries `every_rank` (a distributed run's, raised alike on every rank) keeps it. `flags` maps a library
    argument to the flag the user typed: an error starting "max_batches=0 ..." reads "--max-batches=0 ..."."""
    try:
        yield
    except kinds as err:
        raise UserError(f"{prefix}{as_typed(str(err), flags)}", every_rank=getattr(err, "every_rank", True)) from err


def as_typed(message: str, flags: dict[str, str] | None) -> str:
    """`message` with its leading library argument ("max_batches=0 ...") spelt as the flag the user typed
    ("--max-batches=0 ..."), where `flags` maps it; else unchanged."""
    name = message.split("=", 1)[0] if "=" in message else None
    if flags and name in flags:
        return flags[name] + message[len(name):]
    return message


def check_out_dir(what: str, path, create: bool = False) -> None:
    """Raise UserError "<what> '<path>' <why>" when `path` cannot be an output directory (a file, not creatable)."""
    from softmoe.data.io import unusable_dir

    why = unusable_dir(path, create=create)
    if why:
        raise UserError(f"{what} {str(path)!r} {why}")


def fail(command: str, message: str, every_rank: bool = True) -> int:
    """Report `message` as the one line `softmoe <command>: <message>` (see the module docstring for torchrun);
    returns the exit status: 2, or 0 on a rank other than 0 for an error every rank met."""
    line = f"softmoe {command}: {' '.join(str(message).split())}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    rank = int(os.environ.get("RANK", "0"))
    if error_file is None:  # not under torchrun
        print(line, file=sys.stderr)
        return 2
    if every_rank and rank != 0:
        return 0
    line += f" (rank {rank})" if rank else ""
    if error_file:
        # the layout torch.distributed.elastic's own @record writes; its summary prints "py_callstack"
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
    else:  # torchrun without a log directory
        print(line, file=sys.stderr)
    return 2


def exit_without_teardown(status: int) -> None:
    """Under torchrun, once the error is reported: flush and leave at once, without Python's teardown.

    Tearing down a run that failed at its start can deadlock inside torch (gloo): the main thread, holding the GIL,
    frees the DDP reducer, whose process group joins a gloo worker thread that is itself waiting for the GIL to
    free the last broadcast's tensors. Seen on 2026-12-06 under load (test_torchrun_ddp_trains_and_converts hung
    until its timeout, rank 0 stuck in ~ProcessGroupGloo after writing its error). Nothing is lost: the run lock
    was released while the error unwound, and the error file is written.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command `args.func(args)`; a UserError becomes its one line and exit 2 (module docstring)."""
    from softmoe.common.extras import MissingExtra

    try:
        return args.func(args)
    except UserError as err:
        status = fail(args.command, str(err), err.every_rank)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            exit_without_teardown(status)
        return status
    except MissingExtra as err:  # an optional dependency the command needs: say which extra installs it
        print(f"softmoe {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not getattr(args, "resumable", False):
            raise
        print(f"softmoe {args.command}: interrupted; run it again to continue where it stopped", file=sys.stderr)
        return 130
