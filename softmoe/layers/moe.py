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

from typing import NamedTuple

import torch
from torch import nn

from softmoe.common.checks import check_int
from softmoe.layers.experts import ExpertBank, compute_dtype
from softmoe.layers.ffn import SwiGLU
from softmoe.routing import base as routing_base
from softmoe.routing.diagnostics import COUNT_KEYS
from softmoe.routing.record import Routing

__all__ = ["MoELayer", "MoEOutput", "after_step", "dispatch", "combine", "fine_grained", "token_slots", "token_table"]


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
        k: the coarse budget (top-k's k, or the soft routers' soft top-k mass).
        granularity: g >= 1.
    Returns:
        (E * g, H // g, k * g): the routed experts, their width and the routed budget.
    Raises:
        TypeError: g not an int. ValueError: g < 1, or H not divisible by g (naming both).
    """
    check_int("granularity", granularity, 1)
    if d_expert % granularity:
        raise ValueError(f"d_expert={d_expert} (one coarse expert's hidden width) must be divisible by "
                         f"granularity={granularity}")
    return num_experts * granularity, d_expert // granularity, k * granularity


def token_slots(routing: Routing) -> torch.Tensor:
    """(T, K) int64: the real pairs of each token, K = the most experts any token uses; N marks an empty slot.

    Row t lists token t's pair indices in ascending order (the expert-sorted order of the Routing), so
    a per-token sum over a row adds its pairs in the same order `index_add` would. This is the inverse
    of `routing.token_N` as a gather table: summing rows per token becomes one `index_select` plus a
    sum over K, instead of a scatter-add (measured 5-10x slower on CPU, docs/benchmarks.md).
    """
    num_pairs, num_tokens = routing.num_pairs, routing.num_tokens
    # The real pairs only: a static-size routing's padding pairs (all on token 0, zero output) stay out of the
    # table, which would otherwise be as wide as the padding is long. One host sync (this is the CPU path).
    num_real = int(routing.counts_E.sum())
    token_N = routing.token_N[:num_real]
    if num_real == 0:
        return token_N.new_empty(num_tokens, 0)
    if num_tokens == 1:  # one token (a batch-1 decode step) owns every real pair, in order: no sort or count
        return torch.arange(num_real, device=token_N.device).view(1, num_real)
    order_N = torch.argsort(token_N, stable=True)
    counts_T = torch.bincount(token_N, minlength=num_tokens)
    width = int(counts_T.max())  # one host sync: the table's width
    start_T = counts_T.cumsum(0) - counts_T
    token_sorted_N = token_N.index_select(0, order_N)
    rank_N = torch.arange(num_real, device=token_N.device) - start_T.index_select(0, token_sorted_N)
    slots = torch.full((num_tokens * width,), num_pairs, dtype=torch.int64, device=token_N.device)
    slots.index_copy_(0, token_sorted_N * width + rank_N, order_N)
    return slots.view(num_tokens, width)


def token_table(routing: Routing) -> torch.Tensor | None:
    """The per-token gather table of `routing` where it pays, else None (the sums become an index_add).

    On CPU `token_slots` (one host sync for its width) makes the per-token sums a gather, 5-10x faster
    than a scatter-add there. On CUDA, and under torch.compile tracing, None: an `index_add` (atomic adds
    on the device, no host sync, not bitwise deterministic) does the sums instead.
    """
    if routing.token_N.device.type == "cpu" and not torch.compiler.is_compiling():
        return token_slots(routing)
    return None


def _sum_by_token(x_ND: torch.Tensor, token_N: torch.Tensor, slots_TK: torch.Tensor | None,
                  num_tokens: int) -> torch.Tensor:
    """(N, D) -> (T, D): row t = sum of the rows of token t's pairs (zeros for a token without pairs).

    With a `token_slots` table a gather and a sum over K; without one (None) an index_add over token_N.
    """
    if slots_TK is None:
        return x_ND.new_zeros(num_tokens, x_ND.shape[-1]).index_add_(0, token_N, x_ND)
    width = slots_TK.shape[1]
    if width == 0:
        return x_ND.new_zeros(num_tokens, x_ND.shape[-1])
    padded = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[-1])])  # row N: the empty slot
    rows_TKD = padded.index_select(0, slots_TK.reshape(-1)).view(num_tokens, width, -1)
    return rows_TKD[:, 0] if width == 1 else rows_TKD.sum(dim=1)


class _Dispatch(torch.autograd.Function):
    """x_ND = x_TD[token_N] cast to `dtype`; backward sums the pairs' gradients per token in x's dtype."""

    @staticmethod
    def forward(ctx, x_TD, token_N, slots_TK, dtype):
        ctx.save_for_backward(token_N, slots_TK)
        ctx.x_dtype, ctx.num_tokens = x_TD.dtype, x_TD.shape[0]
        return x_TD.to(dtype).index_select(0, token_N)  # cast then gather: the same values, half the bytes

    @staticmethod
    def backward(ctx, grad_ND):
        token_N, slots_TK = ctx.saved_tensors
        return _sum_by_token(grad_ND.to(ctx.x_dtype), token_N, slots_TK, ctx.num_tokens), None, None, None


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum of y_ND over token t's pairs by the CPU gather table; backward gathers the token gradient to
    each pair."""

    @staticmethod
    def forward(ctx, y_ND, token_N, slots_TK, num_tokens):
        ctx.save_for_backward(token_N)
        return _sum_by_token(y_ND, token_N, slots_TK, num_tokens)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_N,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_N), None, None, None


def dispatch(x_TD: torch.Tensor, routing: Routing, slots_TK: torch.Tensor | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather each routed pair's token row, in expert-sorted order: (T, D) -> (N, D).

    Args:
        x_TD: (T, D) token rows.
        routing: the Routing.
        slots_TK: optional `token_table(routing)` (computed if None; pass it to share it with `combine`).
        dtype: optional dtype of the gathered rows (e.g. the autocast dtype: casting before the gather
            moves half the bytes); gradients reach x_TD in its own dtype. Default: x_TD's dtype.
    """
    slots_TK = token_table(routing) if slots_TK is None else slots_TK
    return _Dispatch.apply(x_TD, routing.token_N, slots_TK, x_TD.dtype if dtype is None else dtype)


def combine(y_ND: torch.Tensor, routing: Routing, slots_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Weight each pair's expert output and sum per token: (N, D) -> (T, D).

    Unrouted (padding) tokens get zeros. The weights are cast to the expert output's dtype, so under
    autocast the sum runs in the autocast dtype, as a dense FFN's output would. `slots_TK` as in
    `dispatch`. The per-token sum is a gather (`token_slots`) on CPU, an index_add elsewhere (`token_table`).
    """
    slots_TK = token_table(routing) if slots_TK is None else slots_TK
    weighted_ND = y_ND * routing.weight_N.unsqueeze(-1).to(y_ND.dtype)
    if slots_TK is None:
        # The device path: autograd's own index_add, whose backward gathers exactly as _Combine's does. (Wrapping
        # it in _Combine gave wrong gradients under torch.compile with torch 2.11: test_dispatch_combine.py.)
        return weighted_ND.new_zeros(routing.num_tokens, weighted_ND.shape[-1]).index_add(0, routing.token_N,
                                                                                         weighted_ND)
    return _Combine.apply(weighted_ND, routing.token_N, slots_TK, routing.num_tokens)


class MoEOutput(NamedTuple):
    """What `MoELayer.forward` returns: `y, aux_loss, stats, router_logits = layer(x)`.

    Attributes:
        output: (..., D) the layer's output, x's shape.
        aux_loss: 0-d float32, differentiable: the router's configured weighted aux terms (load balance,
            z-loss, router-specific ones). Add it to the training loss.
        stats: LayerStats, a dict of detached tensors: k, active_experts_mean, active_experts_hist, expert_load,
            expert_counts (E,) and real_tokens (the raw counts `after_step` sums), load_cv, load_max_over_mean,
            dead_fraction, logit_spread, weight_sum_mean, load_balance_loss, z_loss, and router-specific entries
            (SoftMoE: alpha, threshold, kept_mass); docs/routers.md, "Routing diagnostics".
        router_logits: (T, E) float32 router scores of the flattened tokens (padding rows 0), as
            transformers' MoE models return them under `output_router_logits`.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    stats: routing_base.LayerStats
    router_logits: torch.Tensor


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
        k: top-k's k, or the soft router's soft top-k mass when no budget k_l is passed (coarse;
            the router gets k * g).
        experts_impl: "auto" (default: "grouped" on CUDA, "padded" on CPU), "padded", "grouped" (torch
            grouped_mm) or "loop" (the reference). See layers/experts.py.
        num_shared_experts: s >= 0 always-on experts (default 0: none).
        granularity: g >= 1 routed experts per coarse expert (default 1: coarse).
        **router_options: fields of the router's config dataclass (e.g. alpha, min_weight, combine).
    Returns (forward): MoEOutput(output, aux_loss, stats, router_logits). Nothing is stored on the layer, so the
    forward can run twice (activation checkpointing) and results reach the caller only as return values.
    To put the layer inside a model whose code expects a tensor (a transformers Llama's `mlp`), attach it
    to a SoftMoEBudget (softmoe/routing/budget.py, docs/library.md).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, router: str = "softmoe", k: float = 2.0,
                 experts_impl: str = "auto", num_shared_experts: int = 0, granularity: int = 1,
                 **router_options):
        super().__init__()
        if router == "dense":
            raise ValueError("router='dense' is not an MoE router; use softmoe.layers.SwiGLU for the dense baseline")
        check_int("num_shared_experts", num_shared_experts, 0)
        check_int("d_hidden", d_hidden, 1)
        routed_experts, routed_hidden, routed_k = fine_grained(num_experts, d_hidden, k, granularity)
        self.d_model = d_model
        self.router = routing_base.build_router(router, d_model, routed_experts, routed_k, **router_options)
        self.experts = ExpertBank(routed_experts, d_model, routed_hidden, impl=experts_impl)
        # s shared experts of width H/g summed == one SwiGLU of width s*H/g (concatenated hidden units).
        self.shared_experts = SwiGLU(d_model, num_shared_experts * routed_hidden) if num_shared_experts else None

    @property
    def uses_budget(self) -> bool:
        """Whether this layer takes a per-layer k_l from the model's Budget (softmoe)."""
        return self.router.uses_budget

    @property
    def causal(self) -> bool:
        """Whether a token's output depends on that token alone (False for expert choice)."""
        return self.router.causal

    def forward(self, x: torch.Tensor, mean_k: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, measure: bool = True) -> MoEOutput:
        """(B, S, D) -> MoEOutput with a (B, S, D) output; any leading shape works.

        Args:
            x: (..., D) hidden states.
            mean_k: optional 0-d tensor, this layer's k_l from the model's Budget (soft routers).
            attention_mask: optional (...) bool or 0/1, True/1 = real token (transformers' convention);
                padding outputs are 0 and excluded from aux losses and statistics.
            measure: False (inference only) skips the aux losses and statistics (GateRouter.forward).
        """
        x_TD = self._flatten(x)
        mask_T = self._flatten_mask(attention_mask, x)
        if mean_k is not None and not (isinstance(mean_k, torch.Tensor) and mean_k.dim() == 0):
            raise ValueError(f"mean_k must be a 0-d tensor (this layer's k_l, e.g. budget()[i]), got {mean_k!r}")
        out = self.router(x_TD, mask_T=mask_T, k=mean_k, measure=measure)
        slots_TK = token_table(out.routing)
        x_ND = dispatch(x_TD, out.routing, slots_TK, dtype=compute_dtype(x_TD))
        y_TD = combine(self.experts(x_ND, out.routing.counts_E), out.routing, slots_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self._shared(x_TD, mask_T)
        return MoEOutput(y_TD.reshape(x.shape), out.aux_loss, out.stats, out.logits_TE)

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
        weight_dtype = next(self.experts.parameters()).dtype
        if x_BSD.dtype != weight_dtype and not torch.is_autocast_enabled(x_BSD.device.type):
            raise TypeError(f"x has dtype={x_BSD.dtype} but the layer's parameters are {weight_dtype}: cast one to "
                            f"the other (.to()) or run the layer under torch.autocast")
        return x_BSD.reshape(-1, self.d_model)

    @staticmethod
    def _flatten_mask(pad_mask_BS: torch.Tensor | None, x_BSD: torch.Tensor) -> torch.Tensor | None:
        """The attention_mask argument as (T,) bool, after checking it."""
        if pad_mask_BS is None:
            return None
        if not isinstance(pad_mask_BS, torch.Tensor) or tuple(pad_mask_BS.shape) != tuple(x_BSD.shape[:-1]):
            shape = tuple(pad_mask_BS.shape) if isinstance(pad_mask_BS, torch.Tensor) else type(pad_mask_BS).__name__
            raise ValueError(f"attention_mask has shape {shape}; it must match x's leading shape "
                             f"{tuple(x_BSD.shape[:-1])}")
        if pad_mask_BS.dtype != torch.bool and not ((pad_mask_BS == 0) | (pad_mask_BS == 1)).all():
            bad = pad_mask_BS[(pad_mask_BS != 0) & (pad_mask_BS != 1)].flatten()[0].item()
            raise ValueError(f"attention_mask holds {bad!r}; it must be bool or 0/1 (1 = real token)")
        return pad_mask_BS.reshape(-1).to(torch.bool)


def after_step(calls) -> None:
    """In your own training loop, after each optimizer step: move the routers' non-learned state from the step's
    statistics: the loss-free balancing bias (`loss_free_bias=True`) and ReMoE's L1 coefficient. softmoe's
    trainer does this itself; without it these stay at their initial values.

    Args:
        calls: (MoELayer or the BudgetedMoE wrapping it, the `stats` its forward returned) for every forward of
            the step; a layer run on several micro-batches is listed once per forward (the counts are summed).
            Layers in eval mode are left alone. Routers without such state (SoftMoE, top-k without the bias)
            do nothing. Under data parallelism, all-reduce (sum) each stats' `expert_counts` and `real_tokens`
            over the ranks first, so every rank moves its copy alike.
    Raises:
        ValueError: stats without the counts (a forward with measure=False).
    """
    pairs = []
    for layer, stats in calls:
        missing = [key for key in COUNT_KEYS if key not in stats]
        if missing:
            raise ValueError(f"after_step: the stats lack {missing} (a forward with measure=False); pass the stats "
                             "of the step's training forwards")
        pairs.append((getattr(layer, "moe", layer).router, stats))
    routing_base.step_routers(pairs)
