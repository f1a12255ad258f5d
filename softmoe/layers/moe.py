"""The MoE layer: route -> dispatch -> experts -> combine, one path for every router.

Shape legend:
    B   batch
    S   sequence
    T   tokens (B * S)
    D   d_model
    E   experts
    N   routed (token, expert) pairs, sorted by expert; data dependent
    g   granularity (fine-grained experts per coarse expert)
"""

from __future__ import annotations

import torch
from torch import nn

from softmoe.layers.experts import ExpertBank
from softmoe.layers.ffn import SwiGLU
from softmoe.routing import base as routing_base
from softmoe.routing.record import Routing

__all__ = ["MoELayer", "dispatch", "combine", "fine_grained"]


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def fine_grained(num_experts: int, d_expert: int, k: float, granularity: int) -> tuple[int, int, float]:
    """Split every expert into `granularity` experts (DeepSeekMoE, Dai et al. 2024).

    E experts of width H with budget k become E * g experts of width H / g with budget k * g, so the
    active FFN parameters and FLOPs per token (k * 3 * D * H) and the total expert parameters are
    those of the coarse layer; only the routing is finer. g = 1 changes nothing. This is the one
    place the scaling happens: MoELayer and ModelConfig (its `routed_*` properties and the Budget's
    K) both call it.

    Args:
        num_experts: E, coarse experts.
        d_expert: H, hidden width of one coarse expert; must be divisible by g.
        k: the coarse budget (top-k's k, or the soft routers' mean active experts).
        granularity: g >= 1.
    Returns:
        (E * g, H // g, k * g): the routed experts, their width and the routed budget.
    Raises:
        ValueError: g not an int >= 1, or H not divisible by g (naming both).
    """
    _check_int("granularity", granularity, 1)
    if d_expert % granularity:
        raise ValueError(f"d_expert={d_expert} (one coarse expert's hidden width) must be divisible by "
                         f"granularity={granularity}")
    return num_experts * granularity, d_expert // granularity, k * granularity


def dispatch(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather each routed pair's token row, in expert-sorted order: (T, D) -> (N, D)."""
    return x_TD.index_select(0, routing.token_N)


def combine(y_ND: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Weight each pair's expert output and sum per token: (N, D) -> (T, D).

    Unrouted (padding) tokens get zeros. The weights are cast to the expert output's dtype, so under
    autocast the sum runs in the autocast dtype, as a dense FFN's output would.
    """
    weighted_ND = y_ND * routing.weight_N.unsqueeze(-1).to(y_ND.dtype)
    y_TD = y_ND.new_zeros(routing.num_tokens, y_ND.shape[-1])
    return y_TD.index_add(0, routing.token_N, weighted_ND)


class MoELayer(nn.Module):
    """Dropless Mixture-of-Experts FFN with a pluggable router.

    Pipeline of `forward`:
        1. flatten x (B, S, D) to tokens x_TD (and the padding mask to mask_T);
        2. the router maps x_TD to a ragged Routing (token_N, expert_N, weight_N, counts_E), plus aux
           losses and statistics;
        3. dispatch gathers x_ND in expert-sorted order;
        4. the expert bank runs expert e on its contiguous rows (no capacity, nothing dropped);
        5. combine scales by weight_N and index-adds back into y_TD;
        6. shared experts (if any) run on every real token and are added; reshape to (B, S, D).

    Fine-grained and shared experts (DeepSeekMoE, Dai et al. 2024):
        granularity g splits every expert into g experts of width H / g: the layer routes over E * g
        experts with budget k * g (`fine_grained`), keeping active and total expert parameters equal
        to the coarse layer. `num_experts`, `d_hidden` and `k` are the COARSE values; `mean_k`,
        `stats["k"]` and every routing statistic count routed (fine) experts. Router options are
        passed unchanged (e.g. null's num_null, top-p's max_active are not scaled).
        num_shared_experts s adds s always-on experts of the routed width H / g, implemented as ONE
        SwiGLU of width s * H / g: the sum of s SwiGLU experts equals one SwiGLU whose hidden units are
        their concatenation, so this is mathematically s separate shared experts summed (weight 1
        each). Padding tokens get no shared output either.

    Args:
        d_model: D.
        d_hidden: H, hidden width of one (coarse) SwiGLU expert.
        num_experts: E, coarse experts.
        router: a registered router name ("softmoe", "topk", ...).
        k: top-k's k, or the soft router's mean active experts when no budget k_l is passed (coarse;
            the router gets k * g).
        experts_impl: "padded" (default; fastest on CPU), "grouped" (torch grouped_mm) or "loop" (the
            reference). See layers/experts.py.
        num_shared_experts: s >= 0 always-on experts (default 0: none).
        granularity: g >= 1 routed experts per coarse expert (default 1: coarse).
        **router_options: fields of the router's config dataclass (e.g. alpha, min_weight, combine).
    Attributes after forward:
        aux_loss: 0-d float32, differentiable sum of the configured aux terms.
        stats: LayerStats, detached (k, active_experts_mean, active_experts_hist, expert_load,
            load_balance_loss, z_loss, and router-specific entries).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, router: str = "softmoe", k: float = 2.0,
                 experts_impl: str = "padded", num_shared_experts: int = 0, granularity: int = 1,
                 **router_options):
        super().__init__()
        if router == "dense":
            raise ValueError("router='dense' is not an MoE router; use softmoe.layers.SwiGLU for the dense baseline")
        _check_int("num_shared_experts", num_shared_experts, 0)
        _check_int("d_hidden", d_hidden, 1)
        routed_experts, routed_hidden, routed_k = fine_grained(num_experts, d_hidden, k, granularity)
        self.d_model = d_model
        self.router = routing_base.build_router(router, d_model, routed_experts, routed_k, **router_options)
        self.experts = ExpertBank(routed_experts, d_model, routed_hidden, impl=experts_impl)
        # s shared experts of width H/g summed == one SwiGLU of width s*H/g (concatenated hidden units).
        self.shared_experts = SwiGLU(d_model, num_shared_experts * routed_hidden) if num_shared_experts else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: routing_base.LayerStats | None = None

    @property
    def uses_budget(self) -> bool:
        """Whether this layer takes a per-layer k_l from the model's Budget (softmoe)."""
        return self.router.uses_budget

    @property
    def causal(self) -> bool:
        """Whether a token's output depends on that token alone (False for expert choice)."""
        return getattr(self.router, "causal", True)

    def forward(self, x_BSD: torch.Tensor, mean_k: torch.Tensor | None = None,
                pad_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, S, D); any leading shape works.

        Args:
            x_BSD: (..., D) hidden states.
            mean_k: optional 0-d tensor, this layer's k_l from the model's Budget (soft routers).
            pad_mask_BS: optional (...) bool or 0/1, True/1 = real token; padding outputs are 0 and
                excluded from aux losses and statistics.
        """
        x_TD = self._flatten(x_BSD)
        mask_T = self._flatten_mask(pad_mask_BS, x_BSD)
        out = self.router(x_TD, mean_k=mean_k, mask_T=mask_T)
        y_ND = self.experts(dispatch(x_TD, out.routing), out.routing.counts_E)
        y_TD = combine(y_ND, out.routing)
        if self.shared_experts is not None:
            y_TD = y_TD + self._shared(x_TD, mask_T)
        self.aux_loss, self.stats = out.aux_loss, out.stats
        return y_TD.reshape(x_BSD.shape)

    def _shared(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
        """(T, D) output of the shared experts; padding rows are zeroed BEFORE the FFN (SwiGLU(0) = 0),
        so padding garbage (even NaN) reaches neither the output nor the weight gradients."""
        if mask_T is not None:
            x_TD = torch.where(mask_T.unsqueeze(-1), x_TD, 0.0)
        return self.shared_experts(x_TD)

    def _flatten(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_BSD, torch.Tensor):
            raise TypeError(f"x must be a floating-point tensor, got {type(x_BSD).__name__}")
        if not x_BSD.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype={x_BSD.dtype}")
        if x_BSD.dim() < 1 or x_BSD.shape[-1] != self.d_model:
            raise ValueError(f"x has shape {tuple(x_BSD.shape)}; its last dimension must be d_model={self.d_model}")
        return x_BSD.reshape(-1, self.d_model)

    @staticmethod
    def _flatten_mask(pad_mask_BS: torch.Tensor | None, x_BSD: torch.Tensor) -> torch.Tensor | None:
        if pad_mask_BS is None:
            return None
        if not isinstance(pad_mask_BS, torch.Tensor) or tuple(pad_mask_BS.shape) != tuple(x_BSD.shape[:-1]):
            shape = tuple(pad_mask_BS.shape) if isinstance(pad_mask_BS, torch.Tensor) else type(pad_mask_BS).__name__
            raise ValueError(f"pad_mask_BS has shape {shape}; it must match x's leading shape {tuple(x_BSD.shape[:-1])}")
        if pad_mask_BS.dtype != torch.bool and not ((pad_mask_BS == 0) | (pad_mask_BS == 1)).all():
            bad = pad_mask_BS[(pad_mask_BS != 0) & (pad_mask_BS != 1)].flatten()[0].item()
            raise ValueError(f"pad_mask_BS holds {bad!r}; it must be bool or 0/1 (1 = real token)")
        return pad_mask_BS.reshape(-1).to(torch.bool)
