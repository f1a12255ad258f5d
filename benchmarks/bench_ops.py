"""Soft top-k (LapSum) forward+backward vs hard top-k routing, measured in the same run.

Hard routing = torch.topk + softmax over the chosen scores + scatter into a dense [T, E] mask,
forward and backward through the softmax: what a top-k router costs before dispatch.

`--modes eager compile` also times SOFTMOE_LAPSUM=compile (the solver's row passes compiled by torch.compile;
its first call compiles, outside the timing) in the same interleaved run.

Run:
    .venv/bin/python benchmarks/bench_ops.py            # table
    .venv/bin/python benchmarks/bench_ops.py --json     # also writes benchmarks/results/bench_ops.json
    .venv/bin/python benchmarks/bench_ops.py --tokens 65536 --experts 64 8 --modes eager compile
"""

from __future__ import annotations

import argparse
import os
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


def with_mode(mode: str, fn):
    """fn run with SOFTMOE_LAPSUM=mode."""
    def run(scores):
        before = os.environ.get("SOFTMOE_LAPSUM")
        os.environ["SOFTMOE_LAPSUM"] = mode
        try:
            return fn(scores)
        finally:
            os.environ.pop("SOFTMOE_LAPSUM") if before is None else os.environ.__setitem__("SOFTMOE_LAPSUM", before)
    return run


def bench_shape(tokens: int, experts: int, k: int, repeats: int, modes: tuple[str, ...] = ("eager",)) -> dict:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(tokens, experts, generator=gen).requires_grad_()
    grad = torch.randn(tokens, experts, generator=gen)
    soft = {("soft_topk" if mode == "eager" else f"soft_topk_{mode}"): with_mode(mode, lambda s: soft_topk(s, float(k), 1.0))
            for mode in modes}
    for fn in soft.values():  # a compiled mode compiles on its first call: not timed
        fwd_bwd(fn, scores, grad)()
    timings = time_interleaved(
        {**{name: fwd_bwd(fn, scores, grad) for name, fn in soft.items()},
         "hard_topk": fwd_bwd(lambda s: hard_topk_routing(s, k), scores, grad)},
        repeats=repeats,
    )
    row = {"tokens": tokens, "experts": experts, "k": k, "dtype": "float32"}
    for name, t in timings.items():
        row[name] = timing_dict(t)
        if name != "hard_topk":
            row["ratio" if name == "soft_topk" else f"ratio_{name[len('soft_topk_'):]}"] = (
                t.median / timings["hard_topk"].median)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/bench_ops.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--k", type=int, default=2, help="k for both (soft k is the same real number)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"],
                        help="SOFTMOE_LAPSUM modes of the soft op to time (eager: the default CPU path)")
    parser.add_argument("--name", default="bench_ops", help="results file name (with --json)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = tuple(dict.fromkeys(["eager", *args.modes]))

    rows = [bench_shape(t, e, args.k, args.repeats, modes) for t in args.tokens for e in args.experts]
    print(f"forward+backward, fp32, k={args.k}, alpha=1.0, {torch.get_num_threads()} threads; median (IQR) ms")
    soft_names = ["soft_topk"] + [f"soft_topk_{m}" for m in modes if m != "eager"]
    print(f"{'T':>6} {'E':>4} " + " ".join(f"{n:>20}" for n in soft_names) + f" {'hard top-k':>18} ratio(s)")
    for r in rows:
        h = r["hard_topk"]
        cells = " ".join(f"{r[n]['median'] * 1e3:>11.2f} ({(r[n]['q3'] - r[n]['q1']) * 1e3:6.2f})" for n in soft_names)
        ratios = " ".join(f"{v:.2f}" for key, v in r.items() if key.startswith("ratio"))
        print(f"{r['tokens']:>6} {r['experts']:>4} {cells} {h['median'] * 1e3:>9.2f} ({(h['q3'] - h['q1']) * 1e3:5.2f}) "
              f"{ratios}")
    target_row = next((r for r in rows if r["tokens"] == TARGET["tokens"] and r["experts"] == TARGET["experts"]), None)
    met = None
    if target_row is not None:
        best = min(v for key, v in target_row.items() if key.startswith("ratio"))
        met = best <= TARGET["max_ratio"]
        print(f"target: ratio <= {TARGET['max_ratio']} at T={TARGET['tokens']}, E={TARGET['experts']}: "
              f"{best:.2f} -> {'met' if met else 'MISSED'}")
    if args.json:
        path = write_json(args.name, rows, {"target": TARGET, "target_met": met, "modes": list(modes),
                                            "command": "benchmarks/bench_ops.py " + " ".join(sys.argv[1:])})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
