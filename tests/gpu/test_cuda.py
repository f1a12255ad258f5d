"""CUDA checks (marker `gpu`; skipped without CUDA). Run by benchmarks/gpu_check.sh: `pytest -m gpu tests/gpu`.

- the tiny preset trains on CUDA like on the CPU (fp32: close; bf16 autocast: within bf16 tolerance);
- grouped experts (bf16 grouped_mm) match the padded path; the Triton op matches the eager op at router sizes;
- host syncs counted by CUDA itself (torch.cuda.set_sync_debug_mode): soft_topk 0, one MoE layer forward 1
  (the nonzero sizing the dispatch; 0 in forward and backward with a static bound, dispatch_cap), a non-log
  training step <= MoE layers + 2;
- the model compiled by inductor (fullgraph) matches eager.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from softmoe.layers.experts import ExpertBank
from softmoe.layers.moe import MoELayer
from softmoe.ops import soft_topk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny_trainer(tmp_path: Path, device: str, precision: str):
    from softmoe.train.config import load_run_config
    from softmoe.train.loop import Trainer

    config = load_run_config(CONFIGS / "tiny" / "softmoe.yaml", [
        f"train.out_dir={tmp_path / device}", f"data.data_dir={tmp_path / 'data'}", "train.progress=false",
        "train.tensorboard=false", f"train.device={device}", f"train.precision={precision}"])
    return Trainer(config, report=lambda message: None)


def _losses(trainer, steps: int) -> list[float]:
    return [trainer.train_step(step, summarize=step == steps - 1).loss for step in range(steps)]


@pytest.mark.parametrize("precision, rtol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_tiny_preset_trains_on_cuda_like_on_cpu(tmp_path, precision, rtol):
    cpu, cuda = _tiny_trainer(tmp_path, "cpu", precision), _tiny_trainer(tmp_path, "cuda", precision)
    assert next(cuda.model.parameters()).is_cuda
    cpu_losses, cuda_losses = _losses(cpu, 10), _losses(cuda, 10)
    print(f"{precision}: cpu {cpu_losses}\ncuda {cuda_losses}")
    torch.testing.assert_close(torch.tensor(cuda_losses), torch.tensor(cpu_losses), rtol=rtol, atol=0)
    assert cuda_losses[-1] < cuda_losses[0]


def test_grouped_experts_match_padded_on_cuda():
    torch.manual_seed(0)
    bank = ExpertBank(8, 256, 512).cuda()
    counts = torch.tensor([300, 0, 17, 512, 64, 1, 200, 90], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    outs = {}
    for impl in ("grouped", "padded"):
        bank.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = bank(x, counts).float()
    torch.testing.assert_close(outs["grouped"], outs["padded"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n", [8, 64, 256])
def test_triton_matches_eager_on_cuda(monkeypatch, n):
    gen = torch.Generator(device="cuda").manual_seed(n)
    scores = torch.randn(65536, n, device="cuda", generator=gen)
    k = torch.tensor(min(4.0, n / 4), device="cuda")
    upstream = torch.randn(65536, n, device="cuda", generator=gen)
    results = {}
    for mode in ("triton", "eager"):
        monkeypatch.setenv("SOFTMOE_LAPSUM", mode)
        s = scores.clone().requires_grad_()
        p = soft_topk(s, k, 1.0)
        (p * upstream).sum().backward()
        results[mode] = (p.detach(), s.grad)
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=0, atol=2e-6)
    torch.testing.assert_close(results["triton"][1], results["eager"][1], rtol=1e-4, atol=1e-5)


def _cuda_syncs(fn) -> list[str]:
    """The messages of the synchronizing CUDA calls `fn` makes (torch.cuda.set_sync_debug_mode "warn")."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # only the per-call reports ("called a synchronizing CUDA operation"), not the mode's own prototype notice
    return [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]


def test_soft_topk_makes_no_sync_on_cuda():
    scores = torch.randn(65536, 64, device="cuda", requires_grad=True)
    k, alpha = torch.tensor(2.5, device="cuda"), torch.tensor(1.0, device="cuda")
    soft_topk(scores, k, alpha).sum().backward()  # warm-up (kernel compilation)

    def run():
        soft_topk(scores, k, alpha).square().sum().backward()

    assert _cuda_syncs(run) == []


def test_one_moe_layer_forward_syncs_once_on_cuda():
    torch.manual_seed(0)
    layer = MoELayer(256, 512, 16, router="softmoe", k=2.0).cuda()
    x = torch.randn(8, 256, 256, device="cuda", requires_grad=True)
    mean_k = torch.tensor(2.0, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x, mean_k=mean_k).output.float().square().sum().backward()  # warm-up: grouped_mm probe, Triton compile

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward.y = layer(x, mean_k=mean_k).output

    syncs = _cuda_syncs(forward)
    print(syncs)
    assert len(syncs) <= 1, syncs
    assert _cuda_syncs(lambda: forward.y.float().square().sum().backward()) == []


def test_a_static_bound_layer_makes_no_sync_on_cuda():
    torch.manual_seed(0)
    layer = MoELayer(256, 512, 16, router="softmoe", k=2.0, dispatch_cap=4).cuda()
    x = torch.randn(8, 256, 256, device="cuda", requires_grad=True)
    mean_k = torch.tensor(2.0, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x, mean_k=mean_k).output.float().square().sum().backward()

    step()  # warm-up: grouped_mm probe, Triton compile
    assert _cuda_syncs(step) == []


def test_training_step_sync_budget_on_cuda(tmp_path):
    trainer = _tiny_trainer(tmp_path, "cuda", "bf16")
    num_moe = sum(isinstance(m, MoELayer) for m in trainer.model.modules())
    trainer.train_step(0, summarize=False)
    syncs = _cuda_syncs(lambda: trainer.train_step(1, summarize=False))
    print(syncs)
    assert len(syncs) <= num_moe + 2, syncs


def test_compiled_model_matches_eager_on_cuda():
    from softmoe.model import GPT
    from softmoe.ops.compile import compile_model
    from softmoe.train.config import load_run_config

    torch.manual_seed(0)
    config = load_run_config(CONFIGS / "tiny" / "softmoe.yaml", ["model.d_model=64", "model.d_expert=64"]).model
    model = GPT(config).cuda()
    idx = torch.randint(0, config.vocab_size, (4, 32), device="cuda")
    targets = torch.randint(0, config.vocab_size, (4, 32), device="cuda")
    compiled = compile_model(model)  # inductor, fullgraph

    def run(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(idx, targets, return_logits=False)
        out.objective.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = run(model)
    compiled_loss, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=1e-2)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_eval_and_generate_on_cuda(tmp_path):
    """Validation (train.loop.evaluate), the split scorer and generation run on the model's CUDA device."""
    import numpy as np

    from softmoe.eval.perplexity import evaluate_split
    from softmoe.model import generate
    from softmoe.train.loop import evaluate

    trainer = _tiny_trainer(tmp_path, "cuda", "bf16")
    trainer.train_step(0)
    loss, layers = evaluate(trainer.model, trainer.data.val_batches(2), "bf16")
    assert np.isfinite(loss) and layers
    tokens = np.arange(200, dtype=np.int64) % trainer.config.model.vocab_size
    split = evaluate_split(trainer.model, tokens, 32, batch_size=2, precision="bf16")
    assert np.isfinite(split.loss)
    prompt = torch.tensor([[1, 2, 3]], device="cuda")
    out = generate(trainer.model, prompt, 5, temperature=1.0,
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.shape == (1, 8) and out.is_cuda
