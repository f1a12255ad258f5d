"""torch.compile traces the whole SoftMoE model in one graph (fullgraph=True): router, soft top-k op, ragged
dispatch (one data-dependent size), grouped experts, combine; forward and backward match eager.

One test on tiny dims. It uses the aot_eager backend (Dynamo + AOTAutograd: the same graph capture and
autograd as inductor, no kernel generation) to keep it at ~20 s on a 2-core box; inductor itself runs in the
GPU check (tests/gpu, benchmarks/gpu_check.sh).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmoe.model import GPT
from softmoe.ops.compile import compile_model
from softmoe.train.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.slow
def test_compiled_gpt_forward_backward_matches_eager():
    torch.manual_seed(0)
    config = load_run_config(CONFIGS / "tiny" / "softmoe.yaml", ["model.n_layers=2"]).model
    model = GPT(config)
    idx, targets = torch.randint(0, config.vocab_size, (2, 16)), torch.randint(0, config.vocab_size, (2, 16))
    compiled = compile_model(model, backend="aot_eager")  # fullgraph: any graph break is an error

    def run(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(idx, targets, return_logits=False)
        out.objective.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = run(model)
    compiled_out, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-3, atol=1e-3)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=2e-2, atol=2e-3, msg=name)
    # The routing statistics come back as tensors as in eager.
    assert compiled_out.routing.keys() == eager_out.routing.keys()


@pytest.mark.slow
def test_a_static_bound_layer_compiles_without_data_dependent_sizes():
    """With dispatch_cap the layer's graph has no data-dependent size: fullgraph, no `nonzero` and no
    unbacked symbolic size (which the exact layer's graph has), and forward and backward match eager."""
    from softmoe.layers import MoELayer

    def traced_ops(layer):
        ops = []

        def backend(gm, inputs):
            ops.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
            return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

        return ops, torch.compile(layer, fullgraph=True, backend=backend)

    def run(forward, layer, x):
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x_in, mean_k=torch.tensor(1.7))
        (out.output.float().square().sum() + out.aux_loss).backward()
        return out, x_in.grad, {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}

    x = torch.randn(2, 12, 16)
    graphs = {}
    for cap in (None, 4):
        torch.manual_seed(0)
        layer = MoELayer(16, 32, 8, router="softmoe", k=2.0, dispatch_cap=cap)
        ops, compiled = traced_ops(layer)
        eager_out, eager_dx, eager_grads = run(layer, layer, x)
        compiled_out, compiled_dx, compiled_grads = run(compiled, layer, x)
        graphs[cap] = ops
        torch.testing.assert_close(compiled_out.output, eager_out.output, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(compiled_dx, eager_dx, rtol=2e-2, atol=2e-3)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=2e-2, atol=2e-3, msg=name)
    assert "nonzero" in graphs[None] and "aten.sym_size.int" in graphs[None]  # the exact layer's one ragged size
    assert "nonzero" not in graphs[4] and "nonzero_static" in graphs[4]
    assert not any("sym_size" in op or "_assert_scalar" in op for op in graphs[4]), graphs[4]
