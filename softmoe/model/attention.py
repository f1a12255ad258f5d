"""Causal self-attention with rotary position embeddings (RoPE) and a KV cache for decoding.

Shape legend:
    B   batch
    S   query positions in this call (the whole sequence in training, 1 per step when decoding)
    L   key positions visible to the queries (cached + new)
    f   RoPE frequencies (Dh / 2)
    H   heads
    Dh  head dim
    D   d_model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["rope_tables", "apply_rope", "padded_positions", "padded_causal_mask", "KVCache", "CausalSelfAttention"]


def rope_tables(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, each (max_seq_len, head_dim / 2) float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSd: torch.Tensor, cos_Sf: torch.Tensor, sin_Sf: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head vector by position-dependent angles (GPT-NeoX layout).

    x_BHSd is (B, H, S, Dh), or any (..., B, H, S, Dh) stack of such (the attention rotates q and k as one
    (2, B, H, S, Dh) tensor). cos_Sf, sin_Sf are (S, f) when every row shares positions, or (B, 1, S, f) for
    per-row positions.
    """
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_Sf - x2 * sin_Sf, x1 * sin_Sf + x2 * cos_Sf], dim=-1)
    return rotated.to(x_BHSd.dtype)


def padded_positions(real_BL: torch.Tensor) -> torch.Tensor:
    """(B, L) int64 RoPE position of every slot: each row's first real token is 0, padding repeats a neighbour.

    Args:
        real_BL: (B, L) bool, True = real token; a row's real tokens are contiguous (checked by the decoder).
    """
    return (real_BL.long().cumsum(dim=1) - 1).clamp(min=0)


def padded_causal_mask(real_BL: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, S, L) bool attention mask of the last S slots, True = may attend: causal and real keys only.

    A padding query may also attend to itself. Otherwise its row would be all False and SDPA would
    return NaN there. Padding outputs are discarded, but a NaN would not stay put: the next layer's
    value vector of that slot enters every real query's weighted sum with weight 0, and 0 * NaN = NaN.
    So no row is ever empty (a real query's own key is real, so this changes nothing for real tokens).
    """
    L = real_BL.shape[1]
    k_pos = torch.arange(L, device=real_BL.device)
    q_pos = k_pos[L - S:].unsqueeze(1)
    mask_BSL = ((k_pos <= q_pos) & real_BL.unsqueeze(1)) | (k_pos == q_pos)
    return mask_BSL.unsqueeze(1)


class KVCache:
    """Keys and values of every attention layer for positions [0, length), preallocated.

    The decoder advances `length` once per forward, after all layers have written their slice.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at [length, length + S) and return all L = length + S of them."""
        end = self.length + k_BHSd.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer][:, :, self.length:end] = k_BHSd
        self.v[layer][:, :, self.length:end] = v_BHSd
        # Under autocast the new keys may be bf16 while the cache is fp32: hand back the caller's dtype.
        return self.k[layer][:, :, :end].to(k_BHSd.dtype), self.v[layer][:, :, :end].to(v_BHSd.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention: fused qkv projection, RoPE on q and k, SDPA, output projection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_Sf: torch.Tensor, sin_Sf: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0,
                mask_B1SL: torch.Tensor | None = None) -> torch.Tensor:
        """Attend causally over the sequence (and over the cache's earlier positions, if given).

        Args:
            x_BSD: (B, S, D) normalised hidden states of slots [start, start + S).
            cos_Sf, sin_Sf: (S, f) RoPE tables for those positions, or (B, 1, S, f) per-row (padding).
            cache: optional KV cache; start = cache.length. This layer writes its slice.
            layer: this layer's index in the cache.
            mask_B1SL: optional (B, 1, S, L) bool mask (padded_causal_mask), True = may attend; it
                replaces the causal mask. None (no padding) keeps SDPA's causal fast path.
        Returns:
            (B, S, D) attention output.
        """
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos_Sf, sin_Sf).unbind(0)  # q and k in one call: half the operators
        v = qkv[2]
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
        if mask_B1SL is not None:
            y_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SL)
        else:
            y_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(S, start, x_BSD.device),
                                                    is_causal=start == 0 and S > 1)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


def _causal_mask(S: int, start: int, device: torch.device) -> torch.Tensor | None:
    """(S, start + S) bool mask, True = may attend; None when SDPA's own masks suffice.

    SDPA's is_causal aligns the mask top-left, which is wrong once queries start after cached keys,
    so chunks that follow a cache get an explicit bottom-right aligned mask. One query needs none.
    """
    if start == 0 or S == 1:
        return None
    q_pos = torch.arange(start, start + S, device=device).unsqueeze(1)
    return torch.arange(start + S, device=device).unsqueeze(0) <= q_pos
