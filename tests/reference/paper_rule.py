"""A slow per-token loop reference of the paper's SoftMoE routing rule, written from the method notes' text
(summarised in docs/method.md).

It calls nothing from softmoe: the soft top-k is the float64 bisection of lapsum_reference.py.
"""

from __future__ import annotations

import math

import torch

from tests.reference.lapsum_reference import soft_topk_reference


def paper_rule_weights(logits_TE: torch.Tensor, k: float, alpha: float = 1.0, threshold: float = 1.8,
                       cap_factor: float = 2.0) -> torch.Tensor:
    """(T, E) float64 combine weights: kept raw p, zeros elsewhere, one token at a time."""
    num_tokens, num_experts = logits_TE.shape
    out = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    for t in range(num_tokens):
        p = soft_topk_reference(logits_TE[t:t + 1].double(), k, alpha)[0]
        m = min(math.ceil(k * cap_factor), num_experts)
        ranked = sorted(p.tolist(), reverse=True)
        tau = min(max(threshold * k / num_experts, ranked[m - 1]), ranked[0])
        for e in range(num_experts):
            if p[e].item() >= tau:
                out[t, e] = p[e]
    return out
