"""Our top-k layer (normalize=True) equals transformers' MixtralSparseMoeBlock given the same weights.

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_hf_mixtral.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.layers import MoELayer

transformers = pytest.importorskip("transformers")


def test_topk_layer_equals_hf_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    d, h, e = 16, 32, 4
    ours = MoELayer(d, h, e, router="topk", k=2.0, normalize=True)
    config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e, num_experts_per_tok=2,
                           router_jitter_noise=0.0)
    config._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w_gate, ours.experts.w_up], dim=2).transpose(1, 2))
        hf.experts.down_proj.copy_(ours.experts.w_down.transpose(1, 2))
        x = torch.randn(2, 5, d)
        torch.testing.assert_close(ours(x).output, hf(x), rtol=0, atol=1e-5)
