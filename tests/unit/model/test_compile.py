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
