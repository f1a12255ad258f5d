"""Soft top-k (LapSum) forward+backward vs hard top-k routing, measured in the same run.

Hard routing = torch.topk + softmax over the chosen scores + scatter into a dense [T, E] mask,
forward and backward through the softmax: what a top-k router costs before dispatch.

Run:
    .venv/bin/python benchmarks/bench_ops.py            # table
    .venv/bin/python benchmarks/bench_ops.py --json     # also writes benchmarks/results/bench_ops.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.timing import time_interleaved, timing_dict, write_json  # noqa: E402
from softmoe.ops import soft_topk  # noqa: E402

TOKENS = (4096, 65536)
EXPERTS = (8, 64, 256)
TARGET = {"tokens": 65536, "experts": 64, "max_ratio": 1.5}


def hard_topk_routing(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, E) dense routing weights: softmax over the top-k scores, zeros elsewhere."""
    top_scores, top_idx = scores_TE.topk(k, dim=-1)
    return torch.zeros_like(scores_TE).scatter(-1, top_idx, torch.softmax(top_scores, dim=-1))


def fwd_bwd(fn, scores_TE: torch.Tensor, grad_TE: torch.Tensor):
    def run():
        scores_TE.grad = None
        fn(scores_TE).backward(grad_TE)

    return run


def bench_shape(tokens: int, experts: int, k: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(tokens, experts, generator=gen).requires_grad_()
    grad = torch.randn(tokens, experts, generator=gen)
    timings = time_interleaved(
        {
            "soft_topk": fwd_bwd(lambda s: soft_topk(s, float(k), 1.0), scores, grad),
            "hard_topk": fwd_bwd(lambda s: hard_topk_routing(s, k), scores, grad),
        },
        repeats=repeats,
    )
    return {
        "tokens": tokens,
        "experts": experts,
        "k": k,
        "dtype": "float32",
        "soft_topk": timing_dict(timings["soft_topk"]),
        "hard_topk": timing_dict(timings["hard_topk"]),
        "ratio": timings["soft_topk"].median / timings["hard_topk"].median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/bench_ops.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--k", type=int, default=2, help="k for both (soft k is the same real number)")
    args = parser.parse_args()

    rows = [bench_shape(t, e, args.k, args.repeats) for t in TOKENS for e in EXPERTS]
    print(f"forward+backward, fp32, k={args.k}, alpha=1.0, {torch.get_num_threads()} threads; median (IQR) ms")
    print(f"{'T':>6} {'E':>4} {'soft_topk':>18} {'hard top-k':>18} {'ratio':>6}")
    for r in rows:
        s, h = r["soft_topk"], r["hard_topk"]
        print(
            f"{r['tokens']:>6} {r['experts']:>4} "
            f"{s['median'] * 1e3:>9.2f} ({(s['q3'] - s['q1']) * 1e3:5.2f}) "
            f"{h['median'] * 1e3:>9.2f} ({(h['q3'] - h['q1']) * 1e3:5.2f}) {r['ratio']:>6.2f}"
        )
    target_row = next(r for r in rows if r["tokens"] == TARGET["tokens"] and r["experts"] == TARGET["experts"])
    met = target_row["ratio"] <= TARGET["max_ratio"]
    print(
        f"target: ratio <= {TARGET['max_ratio']} at T={TARGET['tokens']}, E={TARGET['experts']}: "
        f"{target_row['ratio']:.2f} -> {'met' if met else 'MISSED'}"
    )
    if args.json:
        path = write_json("bench_ops", rows, {"target": TARGET, "target_met": met})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
