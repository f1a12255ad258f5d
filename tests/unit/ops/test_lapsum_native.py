"""The C loop of the CPU soft top-k (softmoe/ops/lapsum_native.py, softmoe/ops/lapsum_cpu.c): its build, its
fallback, the rows it hands back, and its threads. Its values are tested on both CPU paths in test_lapsum_fast.py
and by the property tests.

Run: .venv/bin/python -m pytest tests/unit/ops/test_lapsum_native.py -q
"""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

from softmoe.ops import lapsum as lapsum_module
from softmoe.ops import lapsum_native, soft_topk
from softmoe.ops.lapsum import _solve_x_general
from tests.reference.lapsum_reference import soft_topk_reference
from tests.unit.ops.native import require_native


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """`library()` with its per-process cache cleared and the build going to tmp_path (restored afterwards)."""
    monkeypatch.setenv("SOFTMOE_CACHE_DIR", str(tmp_path))
    lapsum_native.library.cache_clear()
    yield tmp_path
    lapsum_native.library.cache_clear()


def _solve(r, k, alpha, x_rows="all"):
    lib = require_native()
    R = r.shape[0]
    return lapsum_native.solve(lib, r, torch.full((R,), k), torch.full((R,), r.shape[1] - k), torch.tensor(alpha),
                               _solve_x_general, x_rows)


def test_builds_once_into_the_cache_dir_and_loads(fresh_library):
    require_native()
    built = list(fresh_library.glob("lapsum_cpu-*.so"))
    assert len(built) == 1
    inode = built[0].stat().st_ino
    lapsum_native.library.cache_clear()
    assert lapsum_native.library() is not None
    assert built[0].stat().st_ino == inode  # loaded from the cache, not rebuilt (a build is renamed into place)
    assert not [p for p in fresh_library.iterdir() if p.is_dir()]  # no scratch directory left behind


def test_a_new_build_removes_the_builds_unused_for_a_month(fresh_library):
    day = 86400
    stale, recent, other = (fresh_library / f"lapsum_cpu-{name}.so" for name in ("stale", "recent", "other"))
    for path in (stale, recent, other):
        path.write_bytes(b"")
    now = os.path.getmtime(stale)
    os.utime(stale, (now, now - (lapsum_native.UNUSED_BUILD_DAYS + 1) * day))
    os.utime(recent, (now, now - (lapsum_native.UNUSED_BUILD_DAYS - 1) * day))
    unrelated = fresh_library / "notes.txt"
    unrelated.write_text("kept")
    os.utime(unrelated, (now, now - 365 * day))
    require_native()  # builds into the directory
    left = {p.name for p in fresh_library.iterdir()}
    assert stale.name not in left and {recent.name, other.name, unrelated.name} <= left
    assert len([name for name in left if name.startswith("lapsum_cpu-")]) == 3  # recent, other, the new build


def test_loading_a_build_marks_it_used(fresh_library):
    require_native()
    (built,) = fresh_library.glob("lapsum_cpu-*.so")
    long_ago = built.stat().st_mtime - 100 * 86400
    os.utime(built, (long_ago, long_ago))
    lapsum_native.library.cache_clear()
    assert lapsum_native.library() is not None
    assert built.stat().st_mtime > long_ago + 99 * 86400


def test_without_a_compiler_it_warns_once_and_the_torch_path_runs(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be built.*cannot run the C compiler"):
        assert lapsum_native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning, no second build attempt
        assert lapsum_native.library() is None
        r = torch.randn(16, 8)
        p = soft_topk(r, 2.0, 0.5)
    torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), 2.0, 0.5), atol=4e-6, rtol=0)


def test_a_compiler_error_is_reported_with_its_message(fresh_library, monkeypatch):
    fake = fresh_library / "failing-cc"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning, match="exited with 3: fake compiler: no"):
        assert lapsum_native.library() is None
    assert not list(fresh_library.glob("*.so"))


def test_x_is_written_where_asked():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(64, 8, generator=gen)
    x_all, f, p = _solve(r, 2.0, 0.3, "all")
    x_none, f_none, p_none = _solve(r, 2.0, 0.3, "none")
    assert x_none is None
    assert torch.equal(f, f_none) and torch.equal(p, p_none)
    # x = (r - b) / alpha: p = F(x) and f = F'(x) agree with it.
    torch.testing.assert_close(p, torch.where(x_all < 0, 0.5 * x_all.exp(), 1 - 0.5 * (-x_all).exp()), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(f, 0.5 * (-x_all.abs()).exp(), atol=1e-6, rtol=0)


def test_rows_whose_sum_f_underflows_get_x_for_the_backward():
    # Row 0: two scores 400 above the rest, k = 2: every |x| ~ 200, sum f underflows in float32. Row 1 is ordinary.
    r = torch.tensor([[400.0, 400.0, 0.0, 0.0, -1.0], [1.0, 0.5, 0.0, -0.5, -1.0]])
    x_all = _solve(r, 2.0, 1.0, "all")[0]
    x_backward = _solve(r, 2.0, 1.0, "backward")[0]
    torch.testing.assert_close(x_backward[0], x_all[0], atol=1e-4, rtol=1e-6)  # the flat row: solved for x


def test_rows_it_hands_back_are_solved_by_the_general_solver(monkeypatch):
    require_native()
    handed = []
    original = lapsum_module._solve_x_general
    monkeypatch.setattr(lapsum_module, "_solve_x_general", lambda r, *a: handed.append(r.shape[0]) or original(r, *a))
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(40, 16, generator=gen)
    k = torch.full((40,), 2.0)
    k[::4] = 12.5  # k > n / 2: 10 rows
    with torch.no_grad():  # x not needed: only those rows go to the general solver
        p = soft_topk(r, k, 0.5)
    assert handed == [10]
    torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), k.double(), 0.5), atol=4e-6, rtol=0)
    handed.clear()
    r[1::4, 0] += 1e7  # 10 rows whose threshold lies ~1e10 alpha units below their max (alpha 1e-3)
    p = soft_topk(r, k, 1e-3)
    assert handed and sum(handed) >= 20
    torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), k.double(), 1e-3), atol=4e-6, rtol=0)


def test_a_missing_source_warns_instead_of_raising(fresh_library, monkeypatch):
    monkeypatch.setattr(lapsum_native, "SOURCE", fresh_library / "missing.c")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert lapsum_native.library() is None


def test_a_cache_dir_others_can_write_is_refused(fresh_library, monkeypatch, tmp_path_factory):
    require_native()
    shared = fresh_library / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable: a library planted there would run as this user
    planted = shared / "not-a-library.so"
    planted.write_text("")
    scratch = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("SOFTMOE_CACHE_DIR", str(shared))
    monkeypatch.setattr(lapsum_native.tempfile, "gettempdir", lambda: str(scratch))
    lapsum_native.library.cache_clear()
    assert lapsum_native.library() is not None
    assert not list(shared.glob("lapsum_cpu-*.so"))  # nothing built or loaded there
    private = list(scratch.glob("softmoe-*"))
    assert len(private) == 1 and stat.S_IMODE(private[0].stat().st_mode) == 0o700


def test_a_compiler_command_with_arguments(fresh_library, monkeypatch):
    require_native()
    monkeypatch.setenv("CC", f"env {os.environ.get('CC', 'cc')}")  # as CC="ccache gcc" would be
    assert lapsum_native.library() is not None


def test_overflowing_rows_raise_the_torch_paths_error():
    r = torch.tensor([[3e38, -3e38, 0.0, 1.0]])
    with pytest.raises(ValueError, match="overflows torch.float32"):
        soft_topk(r, 2.0, 1.0)


def test_threads_give_the_same_bits():
    require_native()
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(20000, 8, generator=gen).requires_grad_()
    g = torch.randn(20000, 8, generator=gen)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            r.grad = None
            p = soft_topk(r, 1.5, 0.2)
            p.backward(g)
            results.append((p.detach().clone(), r.grad.clone()))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("n", [2, 3, 8, 16, 32, 64, 100, 128, 257])
def test_every_row_length_matches_the_reference(n):
    # 8, 16, 32 and 64 run specialised copies of the row loop; the rest the generic one.
    gen = torch.Generator().manual_seed(n)
    r = torch.randn(50, n, generator=gen)
    for alpha in (1.0, 0.05):
        p = _solve(r, 1.0, alpha, "none")[2]
        torch.testing.assert_close(p.double(), soft_topk_reference(r.double(), 1.0, alpha), atol=4e-6, rtol=0)


def test_a_read_only_cache_dir_builds_under_the_temporary_directory(fresh_library, monkeypatch, tmp_path_factory):
    require_native()
    locked = fresh_library / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    scratch = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("SOFTMOE_CACHE_DIR", str(locked / "cache"))
    monkeypatch.setattr(lapsum_native.tempfile, "gettempdir", lambda: str(scratch))
    lapsum_native.library.cache_clear()
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: make the directory a file instead
            locked.chmod(0o700)
            (locked / "cache").write_text("not a directory")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert lapsum_native.library() is not None
    finally:
        locked.chmod(0o700)
    assert list(scratch.glob("softmoe-*/lapsum_cpu-*.so"))
