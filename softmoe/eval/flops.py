"""FFN compute and active parameters per token, counted from the routing a model actually used.

Counting rules (matmul FLOPs only, 2 per multiply-accumulate; norms, activations and softmax are
left out because they are small and the same for every router):
    MoE block   realized mean active routed experts a_l x (2 x parameters of one routed expert)
                + 2 x parameters of the shared experts (always on), plus the router (2 x its gate's
                parameters, reported separately; null experts' gate rows included);
    dense block 2 x parameters of its SwiGLU FFN, i.e. one always-active "expert".
Everything is read from the built layers and the measured routing, never from the config's k: with
granularity g a routed expert is the bank's (narrow) expert and a_l counts them; for variable-k
routers (top-p, null, ReMoE, expert choice) a_l is what the routing did, not the nominal budget
(`ModelConfig.active_ffn_params`). Only real (non-padding) tokens are counted.
`expert_flops_per_token` sums both kinds of block, so a dense baseline and an MoE model compare on one
number. Active parameters are the model's parameters minus the routed experts a token does not use on
average: total - sum_l (E_l - a_l) x parameters of one routed expert (the tied embedding counted once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from softmoe.eval.perplexity import LayerRouting
from softmoe.model import GPT

__all__ = ["ComputeCost", "compute_cost"]


@dataclass(frozen=True)
class ComputeCost:
    """Per-token cost of a model under a measured routing."""

    expert_flops_per_token: float  # FFN matmul FLOPs: realized + shared experts (MoE blocks) + dense FFN blocks
    router_flops_per_token: float  # gate matmuls of the MoE blocks
    active_params: float  # parameters a token uses on average (realized routing)
    active_params_non_embedding: float  # the same without the (tied) token embedding
    total_params: int  # every parameter, the tied head counted once
    per_layer_expert_flops: list[float]  # by block, FFN matmul FLOPs per token

    def to_dict(self) -> dict:
        return asdict(self)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def compute_cost(model: GPT, layers: list[LayerRouting]) -> ComputeCost:
    """FLOPs and active parameters per token of `model` given its measured per-layer routing.

    Args:
        model: the decoder that was evaluated.
        layers: one LayerRouting per MoE block (from `evaluate_split`); empty for a dense model.
    Returns:
        ComputeCost.
    """
    realized = {layer.block: layer.active_mean for layer in layers}
    total = model.num_params()
    per_layer, router_flops, unused = [], 0.0, 0.0
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            per_layer.append(2.0 * _numel(block.ffn))
            continue
        if i not in realized:
            raise ValueError(f"layers has no routing for MoE block {i}; got blocks {sorted(realized)}")
        num_experts = block.ffn.experts.w_gate.shape[0]  # routed experts (E * granularity)
        per_expert = _numel(block.ffn.experts) / num_experts
        shared = _numel(block.ffn.shared_experts) if block.ffn.shared_experts is not None else 0
        per_layer.append(2.0 * (realized[i] * per_expert + shared))
        router_flops += 2.0 * _numel(block.ffn.router.gate)
        unused += (num_experts - realized[i]) * per_expert
    active = total - unused
    return ComputeCost(
        expert_flops_per_token=sum(per_layer),
        router_flops_per_token=router_flops,
        active_params=active,
        active_params_non_embedding=active - model.embed.weight.numel(),
        total_params=total,
        per_layer_expert_flops=per_layer,
    )
