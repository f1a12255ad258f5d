"""Realized active experts per token under the paper's rule, against logit spread, E, k and the cap factor c.

The paper's rule (routing/softk.py) keeps p_i >= clamp(1.8 k / E, m-th largest p, largest p), m = min(ceil(c k), E),
with p = LapSum soft top-k (alpha = 1) of the router logits. For i.i.d. normal logits of standard deviation s this
prints the mean number of kept experts per token: the count is set by s and E, and k moves it only through the cap
and through p saturating above 1/2 (tests/property/test_kept_set_invariance.py). The table in docs/routers.md,
"Nominal k and realized count", is this script's output.

Run (seconds on CPU):
    .venv/bin/python benchmarks/realized_count_table.py [--tokens 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from softmoe.ops import soft_topk
from softmoe.routing.softk import relative_keep

SPREADS = (0.1, 0.25, 0.45, 0.7, 1.0, 1.5, 2.0)
EXPERTS = (8, 16, 32, 64)
KS = (1.0, 1.5, 2.0, 3.0)
CAPS = (2.0, 4.0)


def realized_count(num_experts: int, spread: float, k: float, cap_factor: float, tokens: int, seed: int = 0,
                   threshold: float = 1.8, alpha: float = 1.0) -> float:
    """Mean kept experts per token for `tokens` rows of N(0, spread^2) logits over `num_experts` experts."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen) * spread
    p = soft_topk(logits, k, alpha)
    keep = relative_keep(p, torch.tensor(k), threshold, cap_factor)
    return float(keep.sum(-1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000, help="rows of logits per cell")
    parser.add_argument("--json", default=None, help="also write the cells to this JSON file")
    args = parser.parse_args()
    cells = []
    for cap in CAPS:
        print(f"\ncap factor c = {cap:g} (m = min(ceil(c k), E)); threshold 1.8, alpha 1; rows: E, logit std s; "
              f"columns: k\n")
        print("| E | s | " + " | ".join(f"k = {k:g}" for k in KS) + " |")
        print("|---|---|" + "---|" * len(KS))
        for experts in EXPERTS:
            for spread in SPREADS:
                row = [realized_count(experts, spread, k, cap, args.tokens) for k in KS]
                cells += [{"E": experts, "s": spread, "k": k, "c": cap, "active": v} for k, v in zip(KS, row)]
                print(f"| {experts} | {spread:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "cells": cells}, f, indent=1)


if __name__ == "__main__":
    main()
