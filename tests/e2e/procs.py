"""Processes by /proc, for tests that start process trees (torchrun, `softmoe compare --jobs N`) and must see or
end every member.

Read from /proc, not `ps`: CI images may carry a `ps` without procps' options (busybox), which prints nothing and
once left a test waiting for workers it could not see.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["stat", "children", "descendants", "cmdline", "alive", "send"]


def stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first, then the parent's pid), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (FileNotFoundError, ProcessLookupError)
        return None
    return text[text.rindex(")") + 2:].split()


def _children_by_parent() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat(int(entry.name))):
            found.setdefault(int(fields[1]), []).append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own)."""
    by_parent, found, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces; "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running or sleeping, not gone and not a zombie."""
    fields = stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def send(pid: int, sig: signal.Signals) -> None:
    """os.kill, quiet when the process is gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
