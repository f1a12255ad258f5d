"""Naive dense oracles for the MoE layer: every expert runs on every token, weights are dense (T, E).

Shape legend: T tokens, D d_model, E experts.

Nothing here is shared with the fast path except the soft top-k op (tested on its own) and the
layer's parameters: routing weights are rebuilt from their definitions, token by token rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from softmoe.ops.lapsum import soft_topk


def expert_outputs(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E, D): the output of every expert of `layer` on every token."""
    bank = layer.experts
    outs = []
    for e in range(bank.w_gate.shape[0]):
        h = F.silu(x_TD @ bank.w_gate[e]) * (x_TD @ bank.w_up[e])
        outs.append(h @ bank.w_down[e])
    return torch.stack(outs, dim=1)


def topk_weights(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) dense top-k weights from the definition (softmax, k largest, optional renormalise)."""
    cfg = layer.router.config
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    weight = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        idx = torch.argsort(probs[t], descending=True)[: int(cfg.k)]
        chosen = probs[t, idx]
        weight[t, idx] = chosen / chosen.sum() if cfg.normalize else chosen
    return weight


def topp_weights(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) dense top-p weights from the definition: most probable experts first, add experts
    until their summed probability reaches p (the crossing one included), at most max_active."""
    cfg = layer.router.config
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    cap = cfg.max_active or probs.shape[-1]
    weight = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        kept, mass = [], 0.0
        for e in torch.argsort(probs[t], descending=True, stable=True).tolist():
            if len(kept) == cap or (mass >= cfg.p and cfg.p < 1.0):
                break
            kept.append(e)
            mass += float(probs[t, e].detach())
        chosen = probs[t, kept]
        weight[t, kept] = chosen / chosen.sum() if cfg.normalize else chosen
    return weight


def null_weights(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) dense AdaMoE weights from the definition: softmax over E real + num_null null slots,
    the k most probable slots, null picks dropped; kept real probabilities renormalised among the
    kept real experts (a token with no real pick gets an all-zero row) or raw."""
    cfg = layer.router.config
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    weight = probs.new_zeros(probs.shape[0], cfg.num_experts)
    for t in range(probs.shape[0]):
        picks = torch.argsort(probs[t], descending=True, stable=True)[: int(cfg.k)].tolist()
        kept = [e for e in picks if e < cfg.num_experts]
        if not kept:
            continue
        chosen = probs[t, kept]
        weight[t, kept] = chosen / chosen.sum() if cfg.normalize else chosen
    return weight


def expert_choice_weights(layer, x_TD: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """(T, E) dense expert-choice weights from the definition: per group of `group_size` tokens, every
    expert takes the C = clamp(round_half_up(cf * T_g * k / E), 1, T_g) real tokens with the highest
    softmax probability for it (ties: lower token index), weight = that probability."""
    cfg = layer.router.config
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    real = [True] * probs.shape[0] if mask_T is None else [bool(m) for m in mask_T]
    size = cfg.group_size or probs.shape[0]
    weight = torch.zeros_like(probs)
    for start in range(0, probs.shape[0], size):
        tokens = [t for t in range(start, min(start + size, probs.shape[0])) if real[t]]
        if not tokens:
            continue
        capacity = min(len(tokens), max(1, int(cfg.capacity_factor * len(tokens) * cfg.k / cfg.num_experts + 0.5)))
        for e in range(cfg.num_experts):
            ranked = sorted(tokens, key=lambda t: (-float(probs[t, e].detach()), t))
            for t in ranked[:capacity]:
                weight[t, e] = probs[t, e]
    return weight


def softk_weights(layer, x_TD: torch.Tensor, k: float) -> torch.Tensor:
    """(T, E) dense SoftMoE weights: soft top-k, truncate, combine, from the definitions."""
    cfg = layer.router.config
    logits = x_TD.float() @ layer.router.gate.weight.float().t()
    num_experts = logits.shape[-1]
    p = torch.ones_like(logits) if num_experts == 1 else soft_topk(logits, k, float(layer.router.alpha))
    weight = torch.zeros_like(p)
    p_detached = p.detach()  # the kept set is chosen on detached p (the paper's threshold carries no gradient)
    for t in range(p.shape[0]):
        row = p_detached[t]
        order = torch.argsort(row, descending=True)
        if cfg.truncation == "relative" and num_experts > 1:
            m = min(math.ceil(k * cfg.cap_factor), num_experts)
            tau = min(max(cfg.threshold * k / num_experts, float(row[order[m - 1]])), float(row[order[0]]))
            kept = [int(e) for e in order if row[e] >= tau]
        else:
            kept = [int(e) for e in order if row[e] >= cfg.min_weight] or [int(order[0])]
        if cfg.max_active is not None:
            kept = kept[: cfg.max_active]
        kept_idx = torch.tensor(kept)
        if cfg.combine == "raw_p":
            weight[t, kept_idx] = p[t, kept_idx]
        elif cfg.combine == "p":
            weight[t, kept_idx] = p[t, kept_idx] / k
        else:
            w = p[t] * torch.softmax(logits[t], dim=-1)
            weight[t, kept_idx] = w[kept_idx] / (w[kept_idx].sum() if cfg.combine == "mask_softmax" else 1.0)
    return weight


def dense_moe(layer, x_BSD: torch.Tensor, weight_TE: torch.Tensor) -> torch.Tensor:
    """y = sum_e weight[t, e] * expert_e(x_t), every expert on every token; (B, S, D)."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    y_TD = torch.einsum("te,ted->td", weight_TE.to(x_TD.dtype), expert_outputs(layer, x_TD))
    return y_TD.reshape(x_BSD.shape)


def remoe_weights(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) dense ReMoE weights from the definition: w = ReLU(W x); experts with w > 0 are kept,
    the max_active largest if capped; raw weights, no normalisation (a token may keep none)."""
    cfg = layer.router.config
    relu = torch.relu(x_TD.float() @ layer.router.gate.weight.float().t())
    weight = torch.zeros_like(relu)
    for t in range(relu.shape[0]):
        kept = [e for e in torch.argsort(relu[t], descending=True).tolist() if relu[t, e] > 0]
        kept = kept[: cfg.max_active or relu.shape[-1]]
        weight[t, kept] = relu[t, kept]
    return weight


def biased_topk_weights(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E) dense top-k weights with a loss-free bias: the k largest of softmax + b are picked,
    the weights are the unbiased probabilities of those picks (renormalised if `normalize`)."""
    cfg = layer.router.config
    probs = torch.softmax(x_TD.float() @ layer.router.gate.weight.float().t(), dim=-1)
    bias = layer.router.balance.bias_E
    weight = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        idx = torch.argsort(probs[t] + bias, descending=True)[: int(cfg.k)]
        chosen = probs[t, idx]
        weight[t, idx] = chosen / chosen.sum() if cfg.normalize else chosen
    return weight
