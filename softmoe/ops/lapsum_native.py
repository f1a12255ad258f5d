"""The fused C loop of the float32 CPU soft top-k (softmoe/ops/lapsum_cpu.c): built on first use, called through ctypes.

The torch path of `lapsum_fast` costs a chain of memory-bound kernels per pass over the rows; the C loop solves
each row in a few vectorised loops over its entries (the same exact threshold, in double), at 1.4-3.1 ns per entry
at E = 256 (docs/benchmarks.md, "LapSum soft top-k op"). It is plain C with no Python or torch headers: `cc` builds
it in about a second into a cache directory, once per source, compiler flags and CPU (a new build removes the
builds there that no process has loaded for 30 days):

    SOFTMOE_CACHE_DIR   where the built library goes (default: $XDG_CACHE_HOME/softmoe, else ~/.cache/softmoe;
                        where that cannot be written, softmoe-<uid> in the system's temporary directory)
    CC                  the C compiler (default: cc)

Where no compiler works, `library()` warns once and returns None, and the torch path of `lapsum_fast` runs
(the same results, slower). Nothing is built or loaded at import.

Shape legend: R rows, n entries per row.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from softmoe.ops.lapsum_fast import outputs_from_x
from softmoe.ops.lapsum_steps import _check_centred

__all__ = ["library", "solve", "backward"]

SOURCE = Path(__file__).with_name("lapsum_cpu.c")
# -march=native: the vector width of this CPU (the library is cached per CPU model and flags, see `_cpu`);
# -fopenmp-simd: the `omp simd` loops vectorize without OpenMP's runtime.
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
_ROW_GENERAL, _ROW_OVERFLOW, _ROW_FLAT = 1, 2, 3
UNUSED_BUILD_DAYS = 30  # a build no process has loaded for this long is removed after the next build


def _cache_dir() -> Path:
    configured = os.environ.get("SOFTMOE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softmoe"


class CompileError(OSError):
    """The compiler could not be run, or ran and failed (another directory would not help)."""


def _flag_sets(native: bool) -> tuple[tuple[str, ...], ...]:
    """The flags to try, best first: with -march=native where this CPU is identified (see `_cpu`), then without."""
    portable = tuple(flag for flag in _FLAGS if flag != "-march=native")
    return (_FLAGS, portable) if native else (portable,)


def _build(compiler: list[str], flag_sets: tuple[tuple[str, ...], ...], target: Path) -> None:
    """Compile SOURCE into `target` atomically (a temporary file renamed into place: concurrent builds are safe)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for flags in flag_sets:
            try:
                result = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                        capture_output=True, text=True, timeout=120)
            except OSError as error:
                raise CompileError(f"cannot run the C compiler {' '.join(compiler)!r}: {error}") from None
            if result.returncode == 0:  # a compiler that knows no -march=native builds the portable code
                os.replace(built, target)
                return
        raise CompileError(f"{' '.join(compiler)} exited with {result.returncode}: {result.stderr.strip()[-500:]}")


def _cpu() -> str | None:
    """This CPU's model and feature flags from /proc/cpuinfo (a cache shared by machines with other CPUs must not
    share -march=native builds), or None where it cannot be read (then the build is portable, no -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _private_dir(directory: Path) -> Path:
    """`directory`, created with mode 0700 where missing, refused unless it is this user's and no one else can
    write it (a library loaded from it runs as this user: a directory another user can write is a way in)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"{directory} is not private to this user (owner uid {info.st_uid}, mode "
                              f"{stat.S_IMODE(info.st_mode):o}): refusing to build or load a library there")
    return directory


def _mark_used(target: Path) -> None:
    """Stamp `target`'s modification time with now, so that `_prune` sees it as in use (best effort)."""
    try:
        os.utime(target)
    except OSError:
        pass


def _prune(directory: Path, keep: Path) -> None:
    """Remove the builds in `directory` that no process has loaded for UNUSED_BUILD_DAYS (older sources, other
    flags or CPUs; a build still wanted is rebuilt in about a second), after a new build. Best effort: a build
    loaded by a running process stays mapped in it after its file is removed."""
    cutoff = time.time() - UNUSED_BUILD_DAYS * 86400
    for old in directory.glob("lapsum_cpu-*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def _load(compiler: list[str], flag_sets: tuple[tuple[str, ...], ...], name: str) -> ctypes.CDLL:
    """Load `name` from the cache directory, building it there first if needed; where that directory cannot be
    used (a read-only home), from softmoe-<uid> in the system's temporary directory."""
    fallback = Path(tempfile.gettempdir()) / f"softmoe-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    problems = []
    for directory in (_cache_dir(), fallback):
        try:
            target = _private_dir(directory) / name
            if not target.is_file():
                _build(compiler, flag_sets, target)
                _prune(directory, keep=target)
            _mark_used(target)  # first: a concurrent build's prune now sees it in use
            return ctypes.CDLL(str(target))
        except CompileError:
            raise
        except OSError as error:  # the directory cannot be made, written or trusted: try the next one
            problems.append(f"{directory}: {error}")
    raise OSError("no directory can hold the build (" + "; ".join(problems) + ")")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C library (built on first use, cached on disk), or None with a warning where it cannot be built."""
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # e.g. CC="ccache gcc"
    try:
        cpu = _cpu()
        flag_sets = _flag_sets(native=cpu is not None)
        key = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, flag_sets, cpu)).encode()).hexdigest()[:16]
        lib = _load(compiler, flag_sets, f"lapsum_cpu-{key}.so")
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"softmoe: the C loop of the CPU soft top-k could not be built or loaded ({error}); "
                      f"the slower torch path runs instead (set CC to a working C compiler, or SOFTMOE_CACHE_DIR "
                      f"to a writable directory)", RuntimeWarning, stacklevel=2)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.lapsum_forward.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_double, pointer, pointer,
                                   pointer, pointer, ctypes.c_int, ctypes.c_int]
    lib.lapsum_forward.restype = size
    lib.lapsum_backward.argtypes = [pointer, pointer, size, size, ctypes.c_double, pointer, pointer, pointer,
                                    ctypes.c_int]
    lib.lapsum_backward.restype = size
    return lib


def solve(lib: ctypes.CDLL, r_Rn: torch.Tensor, k_R: torch.Tensor, w_R: torch.Tensor, alpha: torch.Tensor,
          general_solver: Callable, x_rows: str) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(x, f, p) of float32 CPU rows (R, n): f = F'(x) and p = F(x) with x = (r - b) / alpha at the exact threshold b.

    `x_rows` says where x is needed: "all"; "backward", only the rows whose sum f may be subnormal (the rows
    `backward` leaves to the caller, who redoes them from x; x elsewhere is left unwritten); "none" (x is None).
    Writing x costs a third of the forward's stores, and only a learned alpha's gradient reads all of it.
    Rows the C loop leaves (k > n / 2, far or degenerate rows; lapsum_cpu.c) go to
    `general_solver(r, k, w, alpha) -> x` with (R', 1) k and w (`lapsum._solve_x_general`).
    Raises ValueError where (max - min) / alpha of a row overflows float32.
    """
    if x_rows not in ("all", "backward", "none"):
        raise ValueError(f"x_rows={x_rows!r} must be 'all', 'backward' or 'none'")
    r_Rn = r_Rn.contiguous()
    k_R, w_R = k_R.contiguous(), w_R.contiguous()
    f, p = torch.empty_like(r_Rn), torch.empty_like(r_Rn)
    x = torch.empty_like(r_Rn) if x_rows != "none" else None
    status = torch.empty(r_Rn.shape[0], dtype=torch.uint8)
    marked = lib.lapsum_forward(r_Rn.data_ptr(), k_R.data_ptr(), w_R.data_ptr(), r_Rn.shape[0], r_Rn.shape[1],
                                float(alpha), x.data_ptr() if x_rows == "all" else None, f.data_ptr(), p.data_ptr(),
                                status.data_ptr(), torch.get_num_threads(), x_rows == "backward")
    if marked:
        _check_centred(not bool((status == _ROW_OVERFLOW).any()), r_Rn, alpha)
        rows = (status == _ROW_GENERAL).nonzero().squeeze(-1)
        if rows.numel():
            x_general = general_solver(r_Rn[rows], k_R[rows, None], w_R[rows, None], alpha)
            f_rows, p_rows = torch.empty_like(x_general), torch.empty_like(x_general)
            outputs_from_x(x_general, f_rows, p_rows)
            f[rows], p[rows] = f_rows, p_rows
            if x is not None:
                x[rows] = x_general
        flat = (status == _ROW_FLAT).nonzero().squeeze(-1)
        if x is not None and flat.numel():
            x[flat] = general_solver(r_Rn[flat], k_R[flat, None], w_R[flat, None], alpha)
    return x, f, p


def backward(lib: ctypes.CDLL, f_Rn: torch.Tensor, grad_out_Rn: torch.Tensor, alpha: torch.Tensor, need_k: bool,
             grad_Rn: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Implicit-function gradients from the saved f = F'(x) (R, n) into the contiguous `grad_Rn`, as
    `lapsum_fast.backward`: returns (grad_k (R,) or None, unsafe (R,) bool), the rows whose sum f is subnormal in
    float32, left for the caller to redo with the softmax form."""
    f_Rn, grad_out_Rn = f_Rn.contiguous(), grad_out_Rn.contiguous()
    grad_k = f_Rn.new_empty(f_Rn.shape[0])
    status = torch.empty(f_Rn.shape[0], dtype=torch.uint8)
    marked = lib.lapsum_backward(f_Rn.data_ptr(), grad_out_Rn.data_ptr(), f_Rn.shape[0], f_Rn.shape[1],
                                 float(alpha), grad_Rn.data_ptr(), grad_k.data_ptr(), status.data_ptr(),
                                 torch.get_num_threads())
    unsafe = status.bool() if marked else torch.zeros(f_Rn.shape[0], dtype=torch.bool)
    return (grad_k if need_k else None), unsafe
