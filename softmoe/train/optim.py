"""AdamW with parameter groups: which tensors get weight decay and which learn at a different rate.

Decisions (documented here and in docs/):
- Weight decay applies to matrices only: attention projections, expert banks, dense FFN, router gates.
- No decay on norms and biases (decaying a gain towards 0 just fights the normalisation), on the tied
  embedding (it is also the output head; decaying it shrinks all logits, the common choice for tied
  heads), and on the budget and routing temperature parameters (theta / k / alpha): these are
  allocations, not weights, and decay would pull k_l towards a uniform split by itself.
- Budget and alpha parameters (the `budget.` module and any parameter named like `alpha`) learn at
  `lr * budget_lr_mult`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_optimizer", "param_groups"]


def _is_allocation_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return name.startswith("budget.") or "alpha" in leaf


def param_groups(model: nn.Module, weight_decay: float, budget_lr_mult: float) -> list[dict]:
    """Split trainable parameters into decay / no-decay / allocation groups.

    Each group carries `lr_mult`, applied by the loop on top of the scheduled learning rate.
    Empty groups are dropped.
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {"decay": [], "no_decay": [], "allocation": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_allocation_param(name):
            groups["allocation"].append(p)
        elif p.dim() >= 2 and id(p) not in embed_ids:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0), "allocation": (0.0, budget_lr_mult)}
    return [
        {"name": key, "params": params, "weight_decay": settings[key][0], "lr_mult": settings[key][1]}
        for key, params in groups.items() if params
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, budget_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW over `param_groups` (the loop sets each group's lr every step)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, budget_lr_mult), lr=lr, betas=betas, eps=eps)
