"""A short demonstration of the LapSum soft top-k next to hard top-k (README command 1 for now)."""

from __future__ import annotations

import torch

from softmoe.common.extras import require
from softmoe.ops import soft_topk
from softmoe.routing import relative_keep, routing_from_mask


def _row_table(title: str, scores_E: torch.Tensor, k: float, alphas: list[float]):
    """One rich Table: scores, the hard top-k mask, and soft top-k weights at several alphas."""
    num_experts = scores_E.shape[0]
    table = require("rich.table", "viz", "softmoe demo").Table(title=title)
    table.add_column("row")
    for e in range(num_experts):
        table.add_column(f"e{e}", justify="right")
    table.add_column("sum", justify="right")
    table.add_row("score", *[f"{v:+.2f}" for v in scores_E.tolist()], "")
    hard = torch.zeros(num_experts).scatter_(0, scores_E.topk(int(k)).indices, 1.0)
    table.add_row(f"hard top-{int(k)}", *[f"{v:.0f}" for v in hard.tolist()], f"{hard.sum():.0f}")
    for alpha in alphas:
        p = soft_topk(scores_E.double(), k, alpha)
        table.add_row(f"soft k={k:g} a={alpha:g}", *[f"{v:.3f}" for v in p.tolist()], f"{p.sum():.6f}")
    return table


def run_demo(seed: int = 0) -> None:
    Console = require("rich.console", "viz", "softmoe demo").Console
    console = Console(width=max(Console().width, 110))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    console.print(_row_table("peaked router scores, k = 2", scores[0] * 2.0, 2.0, [1.0, 0.3, 0.05]))
    console.print(_row_table("flat router scores, k = 2", scores[1] * 0.2, 2.0, [1.0, 0.3, 0.05]))
    console.print(_row_table("fractional budget, k = 1.5", scores[0] * 2.0, 1.5, [0.3]))

    # The paper's truncation: keep p >= tau = clamp(1.8 k / E, m-th largest p, largest p), m = min(ceil(2k), E),
    # so the number of experts varies per token (between 1 and m) and the kept raw p are the weights.
    probs = soft_topk(torch.stack([scores[0] * 2.0, scores[1] * 0.2]), 2.0, 1.0)
    routing = routing_from_mask(probs, relative_keep(probs, torch.tensor(2.0), threshold=1.8, cap_factor=2.0))
    active = routing.active_per_token().tolist()
    console.print(
        f"paper's truncation (alpha 1, tau = clamp(1.8 k/E, 4th p, top p)): peaked row keeps {active[0]} experts, "
        f"flat row keeps {active[1]}; {routing.num_pairs} (token, expert) pairs, per-expert counts "
        f"{routing.counts_E.tolist()}"
    )
