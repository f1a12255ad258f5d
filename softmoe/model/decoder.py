"""The GPT decoder: token embedding -> blocks -> RMSNorm -> tied lm_head, owning the SoftMoE budget.

Shape legend:
    B   batch
    S   positions in this call
    D   d_model
    V   vocab size
    L   MoE layers (the budget's layer axis, as in k_L; block indices in `config.moe_layers`), except in
        pad masks (mask_BL, real_BL): there L = slots visible to this call, cached + new = start + S
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from softmoe.common.checks import check_bool
from softmoe.layers.moe import MoEOutput
from softmoe.model.attention import KVCache, padded_causal_mask, padded_positions, rope_tables
from softmoe.model.block import Block
from softmoe.model.config import ModelConfig
from softmoe.model.loss import linear_cross_entropy
from softmoe.routing.budget import Budget

__all__ = ["GPT", "DecoderOutput", "check_pad_mask"]


@dataclass
class DecoderOutput:
    """What one forward returns. Everything the training loop needs flows through here.

    Attributes:
        logits: (B, S, V) float32 next-token logits ((B, 1, V) with last_only); None when the forward was
            called with return_logits=False (the loss is then computed chunk by chunk, model/loss.py).
        loss: mean cross-entropy over targets != -100, or None without targets.
        aux_loss: scalar, sum of the MoE layers' aux losses plus the budget penalty (0 for dense).
        routing: block index -> that MoE layer's detached stats (MoEOutput.stats: name -> tensor), in block
            order. Its "k" is the layer's k, the budget's k_l for softmoe (the soft top-k mass; the realized count
            is routing[i]["active_experts_mean"]): the one report of the per-layer k.
        router_logits: with output_router_logits=True, one (B * S, E) float32 tensor per MoE layer, in
            block order (transformers' MoE convention); else None.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: dict[int, Mapping] = field(default_factory=dict)
    router_logits: tuple[torch.Tensor, ...] | None = None

    @property
    def objective(self) -> torch.Tensor:
        """The training objective: task loss + aux losses."""
        if self.loss is None:
            raise ValueError("objective needs targets: call the model with targets")
        return self.loss + self.aux_loss


def check_pad_mask(mask_BL: torch.Tensor, shape: tuple[int, int], name: str = "attention_mask") -> torch.Tensor:
    """`mask_BL` as (B, L) bool, True = real token, after checking it; raise ValueError naming `name`.

    Each row's real tokens must be contiguous: padding before them (left), after them (right), or both.
    A 0 between 1s (a hole) has no single position numbering, so it is refused.
    """
    if not isinstance(mask_BL, torch.Tensor) or tuple(mask_BL.shape) != tuple(shape):
        got = tuple(mask_BL.shape) if isinstance(mask_BL, torch.Tensor) else type(mask_BL).__name__
        raise ValueError(f"{name} has shape {got}; it must be (batch, cached + new positions) = {tuple(shape)}")
    if mask_BL.dtype != torch.bool and bool(((mask_BL != 0) & (mask_BL != 1)).any()):
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token), got values "
                         f"{sorted(set(mask_BL.unique().tolist()))[:8]}")
    real_BL = mask_BL.bool()
    # A hole is a 0 with real tokens both before it (count > 0) and after it (count < row total).
    seen_BL = real_BL.long().cumsum(dim=1)
    hole_BL = ~real_BL & (seen_BL > 0) & (seen_BL < seen_BL[:, -1:])
    if bool(hole_BL.any()):
        row, slot = (int(i) for i in hole_BL.nonzero()[0])
        raise ValueError(f"{name} row {row} has a 0 between 1s (a hole, first at slot {slot}); each row "
                         "must be padding, then its real tokens, then padding (right-padded prompts get a hole "
                         "once generation appends tokens: pad them on the left)")
    return real_BL


class GPT(nn.Module):
    """Decoder-only LM. Owns one Budget for all its SoftMoE blocks and passes k_L[l] to block l.

    Args:
        config: the architecture.
        activation_checkpointing: recompute each block's activations in backward instead of keeping them
            (torch.utils.checkpoint, non-reentrant), in training forwards without a KV cache. The loss, aux
            loss, routing stats and gradients are those of the plain forward (tests/unit/model/
            test_activation_checkpointing.py); the memory saving costs one more forward per block.
    """

    def __init__(self, config: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        check_bool("activation_checkpointing", activation_checkpointing)
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.budget = None
        if config.uses_budget:
            # Over routed experts: with granularity g the k_l are in fine experts (K = k * g of E * g).
            self.budget = Budget(len(config.moe_layers), config.routed_experts, config.routed_k,
                                 options=config.budget_options)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init for the modules this file owns; MoE and FFN layers keep their own init.
        # Residual output projections are scaled by 1/sqrt(2 n_layers) so the stream's variance
        # does not grow with depth.
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def num_params(self) -> int:
        """Parameter count (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def causal(self) -> bool:
        """False when an MoE block's router is non-causal (expert choice): no KV-cache decoding then."""
        return all(block.ffn.causal for block in self.blocks if block.is_moe)

    def _check_causal(self) -> None:
        if not self.causal:
            raise ValueError(f"router={self.config.router!r} is not causal (a token's experts depend on the other "
                             "tokens of the forward call, later ones included), so incremental KV-cache decoding "
                             "would route differently from training; generate with a causal router")

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to `max_len` positions (default max_seq_len); causal routers only."""
        self._check_causal()
        c = self.config
        max_len = c.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= c.max_seq_len:
            raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={c.max_seq_len}]")
        return KVCache(c.n_layers, batch_size, c.n_heads, max_len, c.head_dim,
                       dtype=self.embed.weight.dtype, device=self.embed.weight.device)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                attention_mask: torch.Tensor | None = None, return_logits: bool = True,
                output_router_logits: bool = False, measure: bool = True,
                layer_k: torch.Tensor | None = None) -> DecoderOutput:
        """Next-token logits (and loss) for token ids.

        Args:
            input_ids: (B, S) int64 token ids of slots [start, start + S), start = cache.length or 0.
            targets: optional (B, S) int64 NEXT-token ids (already shifted: targets[:, t] is the token after
                input_ids[:, t]); -100 (torch's default ignore_index) is ignored. transformers' unshifted
                `labels` are SoftMoEForCausalLM's (softmoe/export/hf.py).
            cache: optional KV cache, advanced by S.
            last_only: compute logits for the last position only (generation).
            attention_mask: optional (B, L = start + S) bool or 0/1, True = real token, over the cached AND the
                new slots (contiguous real tokens per row: left and/or right padding, no holes). Each row's
                RoPE positions count its real tokens from 0, padding keys are masked out of attention and
                padding tokens are not routed, so a padded row's real outputs equal the unpadded row's (to
                float round-off). Padding slots' logits are meaningless. None = no padding: the training
                path, unchanged.
            return_logits: False (with targets only) skips the (B, S, V) logits: the loss is computed by
                the fused chunked head + cross-entropy (model/loss.py) and `logits` is None. The training
                loop and evaluation use this; the values equal the unfused path's up to float rounding.
            output_router_logits: also return every MoE layer's (B * S, E) router logits.
            measure: False routes without the aux losses and routing statistics (aux_loss 0, `routing` of
                empty mappings): about half the routers' operators, which bound decoding on a GPU
                (benchmarks/decode_ops.py). Inference only: refused where gradients are on. `generate` uses it.
            layer_k: optional (L,) float32 per-layer k_l, `self.layer_k()` computed once by a caller that runs
                many inference forwards with the same weights (`generate`: the budget's ~60 operators once, not
                every step). Inference only (refused where gradients are on: training differentiates the
                budget); None computes it, as every training forward does.
        Returns:
            DecoderOutput.
        """
        idx_BS, targets_BS, pad_mask_BL = input_ids, targets, attention_mask
        if not isinstance(idx_BS, torch.Tensor) or idx_BS.dim() != 2 or idx_BS.dtype != torch.long:
            got = f"shape {tuple(idx_BS.shape)} {idx_BS.dtype}" if isinstance(idx_BS, torch.Tensor) else type(idx_BS)
            raise ValueError(f"input_ids must be a 2-D int64 tensor, got {got}")
        if last_only and targets_BS is not None:
            raise ValueError("last_only=True computes one position's logits; it cannot take targets")
        if not return_logits and targets_BS is None:
            raise ValueError("return_logits=False needs targets: without logits the forward must compute the loss")
        if cache is not None:
            self._check_causal()
        start = 0 if cache is None else cache.length
        S = idx_BS.shape[1]
        if start + S > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + S} positions exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin, padding = self._positions(idx_BS.shape[0], start, S, pad_mask_BL)
        k_L = self.layer_k() if layer_k is None else self._given_layer_k(layer_k)

        x_BSD, routed = self._run_blocks(self.embed(idx_BS), cos, sin, k_L, cache, padding, measure)
        if cache is not None:
            cache.length += S

        x_BSD = self.norm(x_BSD)
        if last_only:
            x_BSD = x_BSD[:, -1:]
        # The tied head is the embedding matrix itself, so there is one tensor to save and decay.
        if not return_logits:
            logits, loss = None, linear_cross_entropy(x_BSD.flatten(0, 1), self.embed.weight, targets_BS.flatten())
        else:
            logits = F.linear(x_BSD, self.embed.weight).float()
            loss = None
            if targets_BS is not None:
                loss = F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten(), ignore_index=-100)
        aux_loss = self._aux_loss([r.aux_loss for r in routed.values()])
        return DecoderOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                             routing={i: r.stats for i, r in routed.items()},
                             router_logits=tuple(r.router_logits for r in routed.values())
                             if output_router_logits else None)

    def _positions(self, B: int, start: int, S: int, pad_mask_BL: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """RoPE cos / sin of slots [start, start + S) and the blocks' padding arguments.

        Without a mask: (S, f) table slices and no padding arguments (the training path). With one:
        (B, 1, S, f) tables at each row's own positions, plus Block's mask_B1SL and real_BS.
        """
        if pad_mask_BL is None:
            return self.rope_cos[start:start + S], self.rope_sin[start:start + S], {}
        real_BL = check_pad_mask(pad_mask_BL, (B, start + S)).to(self.rope_cos.device)
        pos_BS = padded_positions(real_BL)[:, start:]
        padding = {"mask_B1SL": padded_causal_mask(real_BL, S), "real_BS": real_BL[:, start:]}
        return self.rope_cos[pos_BS].unsqueeze(1), self.rope_sin[pos_BS].unsqueeze(1), padding

    def _run_blocks(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_L: torch.Tensor | None,
                    cache: KVCache | None, padding: Mapping[str, torch.Tensor], measure: bool = True
                    ) -> tuple[torch.Tensor, dict[int, MoEOutput]]:
        """All blocks in order; MoE block l gets k_L[l] and returns its MoEOutput (block index -> it).

        `padding` is empty without a pad mask, else Block's mask_B1SL and real_BS. With activation
        checkpointing (training forwards without a cache) each block runs under torch.utils.checkpoint:
        its results are this first forward's return values; the recomputation in backward only rebuilds
        saved activations (same RNG state), so nothing is counted twice.
        """
        routed: dict[int, MoEOutput] = {}
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            # len(routed) = MoE blocks seen so far = this block's index on the budget's layer axis.
            mean_k = k_L[len(routed)] if (block.is_moe and k_L is not None) else None
            if recompute:
                x_BSD, moe = checkpoint(block, x_BSD, cos, sin, mean_k=mean_k, layer=i, use_reentrant=False,
                                        **padding)
            else:
                x_BSD, moe = block(x_BSD, cos, sin, mean_k=mean_k, cache=cache, layer=i, measure=measure,
                                   **padding)
            if moe is not None:
                routed[i] = moe
        return x_BSD, routed

    def layer_k(self) -> torch.Tensor | None:
        """(L,) float32 per-layer k_l from the budget (None without one), out of bf16 autocast (routing runs in
        fp32). Every forward computes it, unless given as `forward(layer_k=...)`."""
        if self.budget is None:
            return None
        with torch.autocast(device_type=self.embed.weight.device.type, enabled=False):
            return self.budget.k().float()

    def _given_layer_k(self, layer_k: torch.Tensor) -> torch.Tensor:
        """`forward`'s layer_k, checked: a (L,) tensor for a model with a budget, and no gradients on."""
        if self.budget is None:
            raise ValueError(f"layer_k is given but router={self.config.router!r} takes no budget; pass None")
        if torch.is_grad_enabled():
            raise ValueError("layer_k precomputes the budget for inference (under torch.no_grad or "
                             "torch.inference_mode); a forward that will be backpropagated computes it")
        shape = (self.budget.num_layers,)
        if not isinstance(layer_k, torch.Tensor) or tuple(layer_k.shape) != shape:
            got = tuple(layer_k.shape) if isinstance(layer_k, torch.Tensor) else type(layer_k).__name__
            raise ValueError(f"layer_k must be a {shape} tensor (model.layer_k()), got {got}")
        return layer_k.float()

    def _aux_loss(self, layer_losses: list[torch.Tensor]) -> torch.Tensor:
        total = self.embed.weight.new_zeros((), dtype=torch.float32)
        for aux in layer_losses:
            total = total + aux.float()
        if self.budget is not None:
            total = total + self.budget.penalty().float()
        return total
