"""Layers: the MoE layer (route -> dispatch -> experts -> combine), the expert bank, the dense FFN, and the
SoftMoEBudget that gives MoE layers inside any model one learned global budget."""

from softmoe.layers.budgeted import BudgetedMoE, RoutingResults, SoftMoEBudget
from softmoe.layers.experts import EXPERT_IMPLS, ExpertBank
from softmoe.layers.ffn import SwiGLU
from softmoe.layers.moe import MoELayer, MoEOutput, after_step, combine, dispatch

__all__ = ["MoELayer", "MoEOutput", "after_step", "ExpertBank", "EXPERT_IMPLS", "SwiGLU", "dispatch", "combine",
           "SoftMoEBudget", "BudgetedMoE", "RoutingResults"]
