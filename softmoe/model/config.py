"""ModelConfig: every architectural choice of the decoder in one frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig", "FFN_KINDS", "ROUTERS"]

FFN_KINDS = ("dense", "moe")
ROUTERS = ("softmoe", "topk")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


def _check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value} must be a finite number > 0")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder: embed -> n_layers x (attention, FFN) -> RMSNorm -> tied lm_head.

    Block i uses an MoE FFN when `ffn == "moe"` and (i + 1) % moe_every == 0, otherwise a dense
    SwiGLU FFN of width d_ff. The input embedding and the output head always share one matrix.
    """

    vocab_size: int = 8192  # V, from the tokenizer
    d_model: int = 256  # D, residual stream width
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads; d_model must divide evenly
    d_ff: int = 1024  # hidden width of the dense SwiGLU FFN (dense blocks)
    ffn: str = "moe"  # "dense" | "moe"
    moe_every: int = 1  # MoE FFN in every n-th block (1 = every block); others are dense
    num_experts: int = 8  # E, experts per MoE layer
    d_expert: int = 256  # hidden width of one SwiGLU expert
    router: str = "softmoe"  # "softmoe" (LapSum soft top-k, learned k_l) | "topk"
    k: float = 2.0  # softmoe: global budget K = mean over MoE layers of k_l; topk: experts per token
    router_options: dict = field(default_factory=dict)  # passed to MoELayer as **router_options
    budget_options: dict = field(default_factory=dict)  # passed to Budget (softmoe only)
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 256  # longest sequence (RoPE table and KV cache size)
    init_std: float = 0.02  # std of embedding and attention weights at init
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        for name, low in [("vocab_size", 2), ("d_model", 1), ("n_layers", 1), ("n_heads", 1), ("d_ff", 1),
                          ("moe_every", 1), ("num_experts", 1), ("d_expert", 1), ("max_seq_len", 1)]:
            _check_int(name, getattr(self, name), low)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r} must be one of {FFN_KINDS}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} must be one of {ROUTERS}")
        for name in ("rope_theta", "init_std", "norm_eps"):
            _check_positive_float(name, getattr(self, name))
        for name in ("router_options", "budget_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.ffn == "moe":
            self._check_moe()

    def _check_moe(self) -> None:
        if self.moe_every > self.n_layers:
            raise ValueError(f"moe_every={self.moe_every} > n_layers={self.n_layers}: the model would have no MoE block")
        _check_positive_float("k", self.k)
        if self.router == "topk" and (float(self.k) != int(self.k) or not 1 <= self.k <= self.num_experts):
            raise ValueError(f"k={self.k} must be an integer in [1, num_experts={self.num_experts}] for router='topk'")
        if self.router == "softmoe" and not 0 < self.k < self.num_experts:
            raise ValueError(f"k={self.k} must be in (0, num_experts={self.num_experts}) for router='softmoe'")

    # ---- derived, read-only ----

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_block(self, i: int) -> bool:
        """Whether block i (0-based) has an MoE FFN."""
        return self.ffn == "moe" and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        """Block indices with an MoE FFN, in order (the budget's layer axis)."""
        return [i for i in range(self.n_layers) if self.is_moe_block(i)]

    def active_ffn_params(self) -> float:
        """FFN parameters a token uses on average (SwiGLU: 3 matrices), summed over blocks.

        MoE blocks count k experts (the budget), so dense and MoE presets can be matched on this.
        """
        dense = 3 * self.d_model * self.d_ff
        moe = 3 * self.d_model * self.d_expert * float(self.k)
        return sum(moe if self.is_moe_block(i) else dense for i in range(self.n_layers))
