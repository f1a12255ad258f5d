"""benchmarks/bench_infer.py arrives working: --quick runs every variant, path and measurement on tiny sizes.

No timing is checked (timings belong to the benchmark's printed, same-run ratios): only that every part ran,
that the SoftMoE variants were calibrated near their AE targets and that the summary is complete.

Run: .venv/bin/python -m pytest tests/unit/test_bench_infer.py -q
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_bench_infer_quick_runs_every_part(capsys):
    from benchmarks.bench_infer import main

    threads = torch.get_num_threads()
    try:
        assert main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for what in ("native/prefill", "native/decode_b1", "native/decode_b32", "hf/prefill", "hf/decode_b1",
                 "hf/decode_b32"):
        assert f"\n{what}: realized AE" in out
    assert out.count("fit top-k") == 6 and out.count("SoftMoE / top-k at equal AE") == 6
    assert "target SoftMoE / top-k" in out and "target decode tokens/s" in out


@pytest.mark.slow
def test_bench_infer_quick_in_bfloat16(capsys):
    """The GPU's configuration (bf16 weights, activations and cache), natively: every variant moves to the dtype,
    the calibrated SoftMoE variants included (their own rotary buffers once stayed behind on the device)."""
    from benchmarks.bench_infer import main

    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--dtype", "bfloat16", "--no-hf", "--decode-batches", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "bfloat16" in out and "\nnative/decode_b2: realized AE" in out and "hf/" not in out


def test_shared_variants_differ_only_in_routing():
    from benchmarks.bench_infer import base_config, build_models

    models = build_models(base_config(quick=True), gate_std=1.0)
    soft, top1, dense = models["softmoe"], models["top1"], models["dense"]
    assert top1.blocks[0].ffn.experts is soft.blocks[0].ffn.experts
    assert top1.blocks[0].ffn.router.gate is soft.blocks[0].ffn.router.gate
    assert dense.embed is soft.embed and dense.blocks[1].attn is soft.blocks[1].attn
    # The dense FFN is expert 0: the same output as that expert on the same rows.
    x = torch.randn(3, soft.config.d_model)
    bank = soft.blocks[0].ffn.experts
    expected = (torch.nn.functional.silu(x @ bank.w_gate[0]) * (x @ bank.w_up[0])) @ bank.w_down[0]
    torch.testing.assert_close(dense.blocks[0].ffn(x), expected)


def test_calibration_reaches_the_target_active_experts():
    from benchmarks.bench_infer import base_config, build_models, calibrate, realized_ae

    model = build_models(base_config(quick=True), gate_std=1.0, topk=())["softmoe"]
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    calibrate(model, ids, 2.0)
    assert abs(realized_ae(model, ids) - 2.0) < 0.1
