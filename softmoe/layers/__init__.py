"""Layers: the MoE layer (route -> dispatch -> experts -> combine), the expert bank, the dense FFN."""

from softmoe.layers.experts import EXPERT_IMPLS, ExpertBank
from softmoe.layers.ffn import SwiGLU
from softmoe.layers.moe import MoELayer, combine, dispatch

__all__ = ["MoELayer", "ExpertBank", "EXPERT_IMPLS", "SwiGLU", "dispatch", "combine"]
