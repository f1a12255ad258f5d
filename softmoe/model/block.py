"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)); the FFN is dense or MoE."""

from __future__ import annotations

import torch
from torch import nn

from softmoe.layers import MoELayer, SwiGLU
from softmoe.layers.moe import MoEOutput
from softmoe.model.attention import CausalSelfAttention, KVCache
from softmoe.model.config import ModelConfig

__all__ = ["Block"]


class Block(nn.Module):
    """Pre-norm block. `is_moe` tells the decoder to pass this block its k_l; an MoE block returns its
    routing result (aux loss, stats, router logits) next to the hidden states."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.is_moe = config.is_moe_block(index)
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if self.is_moe:
            # Coarse (num_experts, d_expert, k): the layer applies `granularity` itself (layers.moe.fine_grained).
            self.ffn = MoELayer(config.d_model, config.d_expert, config.num_experts, router=config.router,
                                k=float(config.k), num_shared_experts=config.num_shared_experts,
                                granularity=config.granularity, **config.router_options.values())
        else:
            self.ffn = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x_BSD: torch.Tensor, cos_Sf: torch.Tensor, sin_Sf: torch.Tensor,
                mean_k: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0,
                mask_B1SL: torch.Tensor | None = None, real_BS: torch.Tensor | None = None, measure: bool = True
                ) -> tuple[torch.Tensor, MoEOutput | None]:
        """(B, S, D) -> ((B, S, D), the MoE layer's MoEOutput or None for a dense block).

        `mean_k` is this block's k_l (budget routers only). With padding, `mask_B1SL` is the attention mask
        (CausalSelfAttention) and `real_BS` (True = real token) keeps padding tokens out of the MoE layer's
        routing, outputs and statistics. `measure` False (inference only): no aux loss or statistics.
        """
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_Sf, sin_Sf, cache, layer, mask_B1SL)
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            routed = self.ffn(h_BSD, mean_k=mean_k, attention_mask=real_BS, measure=measure)
            return x_BSD + routed.output, routed
        return x_BSD + self.ffn(h_BSD), None
