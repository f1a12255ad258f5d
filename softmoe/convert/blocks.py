"""Soft-routed drop-ins for transformers' Mixtral, Qwen2-MoE and OLMoE sparse MoE blocks.

Shape legend:
    T   tokens (batch * sequence)
    D   hidden size
    E   routed experts
    N   routed (token, expert) pairs, sorted by expert; data dependent
    L   converted MoE blocks

A converted block keeps the original block's modules and calls them as the original did:
    1. `gate` (the HF router module, unchanged) gives the (T, E) router logits. Calling it, rather than
       reading its weight, keeps transformers' `output_router_logits` recording working: its hooks
       capture output[0] of the router class. It also computes a hard top-k we do not use (T x E, cheap).
    2. Our rule replaces the hard top-k: p = soft_topk(logits, k_l, alpha), truncation (the paper's relative threshold),
       combine weights, all by `softmoe.routing.softk.soft_routing` as in SoftKRouter (the family's convention: renormalised
       for Mixtral and for norm_topk_prob=True, raw softmax mass otherwise), one ragged `Routing` record.
    3. dispatch -> HF experts -> combine: the HF expert module (fused 3-D weights, whatever
       `config._experts_implementation` selects) runs on the N dispatched rows as N one-expert tokens
       (top_k_index (N, 1), weight 1); our `combine` applies the weights and sums per token.
    4. Qwen2-MoE only: the shared expert and its sigmoid gate are added unchanged.
k_l and alpha live in one `RetrofitState` module on the converted model (its state dict prefix is
`softmoe_retrofit.`); each block holds a plain (unregistered) reference to it and its layer index. A block
returns the hidden states only (the HF decoder layer's contract); its aux loss and statistics go to the
state's `collect()` scope (softmoe/layers/budgeted.py): `with model.softmoe_retrofit.collect() as routing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from softmoe.layers.budgeted import RoutingResults, SoftMoEBudget
from softmoe.layers.moe import MoEOutput, combine, dispatch
from softmoe.routing.base import finish_routing
from softmoe.routing.record import Routing
from softmoe.routing.softk import SoftKConfig, soft_routing

__all__ = ["Family", "FAMILIES", "family_of", "RetrofitState", "SoftRoutedBlock"]


@dataclass(frozen=True)
class Family:
    """What differs between the supported HF MoE blocks."""

    name: str  # "mixtral", "qwen2_moe", "olmoe"
    block_class: str  # the transformers class name of the sparse MoE block
    module: str  # the transformers module that defines it
    renormalises: str | None  # config attribute that switches renormalisation of top-k probs; None = always
    weights_in_logits_dtype: bool  # the original casts routing weights to the logits' dtype
    shared_expert: bool  # sigmoid-gated shared expert added to the routed output (Qwen2-MoE)

    def block_type(self) -> type:
        return getattr(importlib.import_module(self.module), self.block_class)

    def combine_mode(self, config) -> str:
        """The SoftMoE combine mode whose alpha -> 0 limit is this model's top-k combine."""
        renorm = True if self.renormalises is None else bool(getattr(config, self.renormalises))
        return "mask_softmax" if renorm else "mask_softmax_raw"


FAMILIES = (
    Family("mixtral", "MixtralSparseMoeBlock", "transformers.models.mixtral.modeling_mixtral",
           renormalises=None, weights_in_logits_dtype=False, shared_expert=False),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "transformers.models.qwen2_moe.modeling_qwen2_moe",
           renormalises="norm_topk_prob", weights_in_logits_dtype=True, shared_expert=True),
    Family("olmoe", "OlmoeSparseMoeBlock", "transformers.models.olmoe.modeling_olmoe",
           renormalises="norm_topk_prob", weights_in_logits_dtype=True, shared_expert=False),
)


def family_of(module: nn.Module) -> Family | None:
    """The Family whose block class `module` is an instance of, or None."""
    for family in FAMILIES:
        if isinstance(module, family.block_type()):
            return family
    return None


def check_layout(name: str, block: nn.Module) -> tuple[int, int]:
    """(E, top_k) of a supported block; ValueError naming the block when its layout is not the fused one.

    The installed transformers (5.x) stores experts as fused 3-D tensors in one module called as
    experts(hidden (S, D), top_k_index (S, K), top_k_weights (S, K)), and the router as a module with
    `weight` (E, D) returning (logits, top_k_weights, top_k_index). Older versions (a ModuleList of
    per-expert MLPs and an nn.Linear gate) are not supported.
    """
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    fused = (isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList)
             and getattr(getattr(experts, "gate_up_proj", None), "dim", lambda: 0)() == 3)
    router = isinstance(gate, nn.Module) and not isinstance(gate, nn.Linear) and hasattr(gate, "top_k")
    if not (fused and router):
        import transformers

        raise ValueError(
            f"unsupported expert layout in {name} ({type(block).__name__}: experts={type(experts).__name__}, "
            f"gate={type(gate).__name__}) under transformers {transformers.__version__}: softmoe.convert needs "
            "fused 3-D experts (gate_up_proj) and a top-k router module, as in transformers 5.x")
    return int(experts.gate_up_proj.shape[0]), int(gate.top_k)


class RetrofitState(nn.Module):
    """The SoftMoE state a conversion adds to an HF model: the global budget and per-layer alpha.

    Args:
        num_layers: L converted blocks.
        num_experts: E per block.
        budget: K, the global mean active experts (the model's top-k at conversion).
        alpha: initial Laplace scale of every layer's soft top-k (logit units; smaller is harder).
        learn_alpha: alpha is a Parameter (log alpha) rather than a buffer.
        learn_k: the budget's per-layer allocation theta is trained.
        k_min, margin, budget_mode: see softmoe.routing.budget.Budget.
    """

    def __init__(self, num_layers: int, num_experts: int, budget: float, alpha: float, learn_alpha: bool,
                 learn_k: bool, k_min: float, margin: float, budget_mode: str):
        super().__init__()
        self.budget = SoftMoEBudget(num_layers, num_experts, budget, k_min=k_min, margin=margin, mode=budget_mode,
                                    learnable=learn_k)
        log_alpha_L = torch.full((num_layers,), float(torch.tensor(alpha).log()))
        if learn_alpha:
            self.log_alpha_L = nn.Parameter(log_alpha_L)
        else:
            self.register_buffer("log_alpha_L", log_alpha_L)

    def collect(self) -> contextlib.AbstractContextManager[RoutingResults]:
        """Scope collecting the converted blocks' aux losses and statistics (SoftMoEBudget.collect)."""
        return self.budget.collect()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_l, alpha_l) of converted block `index`, both 0-d float32 and differentiable."""
        return self.budget()[index], self.log_alpha_L[index].float().exp()


class SoftRoutedBlock(nn.Module):
    """An HF sparse MoE block routed by truncated soft top-k; the original gate and experts are reused.

    Args:
        block: the HF block (its `gate`, `experts` and, for Qwen2-MoE, `shared_expert` and
            `shared_expert_gate` modules become this module's children, same attribute names, so the
            state dict keys do not change).
        family: the block's Family.
        rule: the SoftKConfig of the routing rule (alpha here is only validated; alpha_l is the state's).
        state: the model's RetrofitState (held unregistered: it is saved once, under the model).
        index: this block's layer index in the budget.
    Results: forward returns the hidden states; inside `state.collect()` each call adds its MoEOutput
    (aux_loss = rule.lb_coef * load balance + rule.z_coef * z-loss of the soft routing; stats: k,
    active_experts_mean, active_experts_hist, expert_load, ..., alpha, kept_mass) to the scope's results.
    """

    def __init__(self, block: nn.Module, family: Family, rule: SoftKConfig, state: RetrofitState, index: int):
        super().__init__()
        self.family, self.rule, self.index = family, rule, index
        self.gate, self.experts = block.gate, block.experts
        if family.shared_expert:
            self.shared_expert, self.shared_expert_gate = block.shared_expert, block.shared_expert_gate
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        object.__setattr__(self, "_state", state)  # not a child: one copy under the model

    def route(self, logits_TE: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor):
        """The SoftMoE rule on given logits (as SoftKRouter, without its gate): a RouterOutput."""
        rule = self.rule
        real_T = torch.ones(logits_TE.shape[0], dtype=torch.bool, device=logits_TE.device)
        routing, extra = soft_routing(logits_TE, k, alpha, rule, real_T)
        return finish_routing(routing, logits_TE, real_T, rule, k, None, extra)

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, D), the original block's signature."""
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative input jitter, out of place
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits_TE = self.gate(x_TD)[0]
        k, alpha = self._state.layer(self.index)
        out = self.route(logits_TE.float(), k, alpha)
        routing = out.routing
        if self.family.weights_in_logits_dtype:  # as the original: weights rounded to the logits' dtype
            routing = _with_weights(routing, routing.weight_N.to(logits_TE.dtype))
        x_ND = dispatch(x_TD, routing)
        ones_N1 = x_ND.new_ones(x_ND.shape[0], 1)
        y_ND = self.experts(x_ND, routing.expert_N.unsqueeze(-1), ones_N1)
        y_TD = combine(y_ND, routing)
        if self.family.shared_expert:
            y_TD = y_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        self._state.budget.record(self.index, MoEOutput(None, out.aux_loss, out.stats, out.logits_TE))
        return y_TD.reshape(hidden_BSD.shape)

    def extra_repr(self) -> str:
        return (f"family={self.family.name!r}, index={self.index}, combine={self.rule.combine!r}, "
                f"truncation={self.rule.truncation!r}, max_active={self.rule.max_active}")


def _with_weights(routing: Routing, weight_N: torch.Tensor) -> Routing:
    return dataclasses.replace(routing, weight_N=weight_N)
