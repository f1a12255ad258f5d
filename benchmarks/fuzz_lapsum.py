"""Fuzz the soft top-k's exactness: |sum p - k| and |p - p_ref| over random extreme inputs.

    .venv/bin/python -m benchmarks.fuzz_lapsum --cases 10000

Each case: n in [2, 64], 4 rows of N(0, 1) * scale (scale log-uniform in [1e-3, 1e6]), ties (every 5th case),
an offset of 0, +-1e3 or +-1e7, alpha log-uniform in [1e-3, 1e3], k uniform in (0, n) or an integer. The
reference is float64 bisection on the same (rounded) inputs (tests/reference/lapsum_reference.py). Prints,
per dtype and solver (SOFTMOE_CHECKS=auto: the float32 CPU path, softmoe/ops/lapsum_fast.py; off: the sync-free closed form), the
worst relative sum error |sum p - k| / (k + 1), the worst |p - p_ref| and how many cases exceed the
property tests' tolerance (float32: 8 n eps (k + 1); bfloat16: 2 eps (k + 1), the output's own rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo's tests/
from softmoe.ops import soft_topk  # noqa: E402
from tests.reference.lapsum_reference import soft_topk_reference  # noqa: E402


def fuzz_cases(cases: int, dtype: torch.dtype, seed: int = 0):
    """Yield (case index, scores (4, n) in dtype, k (4,) float64, alpha) of the fuzz, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for case in range(cases):
        n = int(torch.randint(2, 65, (1,), generator=gen))
        scale = 10 ** (torch.rand(1, generator=gen).item() * 9 - 3)
        alpha = 10 ** (torch.rand(1, generator=gen).item() * 6 - 3)
        offset = [0.0, 1e3, 1e7][case % 3] * (1 if case % 2 else -1)
        r = torch.randn(4, n, generator=gen, dtype=torch.float64) * scale
        if case % 5 == 0:
            r = (r / scale * 2).round() * scale
        r = (r + offset).to(dtype)
        k = torch.rand(4, generator=gen, dtype=torch.float64) * (n - 2e-3) + 1e-3
        if case % 7 == 0:
            k = torch.randint(1, n, (4,), generator=gen).double()
        yield case, r, k, alpha


def fuzz(cases: int, dtype: torch.dtype, checks: str, seed: int = 0) -> dict:
    os.environ["SOFTMOE_CHECKS"] = checks
    eps = torch.finfo(dtype).eps
    worst_sum = worst_p = 0.0
    failures = 0
    for _, r, k, alpha in fuzz_cases(cases, dtype, seed):
        n = r.shape[-1]
        p = soft_topk(r, k, alpha).double()
        err = (p.sum(-1) - k).abs()
        tol = (8 * n * eps if dtype == torch.float32 else 2 * eps) * (k + 1)
        failures += int((err > tol).any())
        worst_sum = max(worst_sum, (err / (k + 1)).max().item())
        worst_p = max(worst_p, (p - soft_topk_reference(r.double(), k, alpha)).abs().max().item())
    return {"dtype": str(dtype).replace("torch.", ""), "checks": checks, "cases": cases,
            "worst_rel_sum_error": worst_sum, "worst_abs_p_error": worst_p, "cases_over_tolerance": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [fuzz(args.cases, dtype, checks) for dtype in (torch.float32, torch.bfloat16) for checks in ("auto", "off")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| dtype | solver | cases | worst abs(sum p - k) / (k + 1) | worst abs(p - p_ref) | cases over tolerance |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        solver = "CPU path (checks on)" if r["checks"] == "auto" else "sync-free closed form (checks off)"
        print(f"| {r['dtype']} | {solver} | {r['cases']} | {r['worst_rel_sum_error']:.2e} | "
              f"{r['worst_abs_p_error']:.2e} | {r['cases_over_tolerance']} |")


if __name__ == "__main__":
    main()
