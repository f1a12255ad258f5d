"""transformers training: SoftMoEForCausalLM follows Mixtral's aux-loss convention (output_router_logits,
router_aux_loss_coef, aux_loss), so `transformers.Trainer` trains the routers' load balancing.

Run: .venv/bin/python -m pytest -q tests/unit/export/test_hf_trainer.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM
from softmoe.model import ModelConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the dev extra)")

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16, k=1.5,
                   max_seq_len=16, router_options={"lb_coef": 0.1})


def make_model(**hf_options) -> SoftMoEForCausalLM:
    torch.manual_seed(0)
    return SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY, **hf_options))


def gates(model: SoftMoEForCausalLM) -> list[torch.Tensor]:
    return [b.ffn.router.gate.weight.detach().clone() for b in model.model.blocks if b.is_moe]


def test_forward_follows_mixtral():
    model = make_model(router_aux_loss_coef=0.5)
    ids = torch.randint(0, 64, (2, 10))
    plain = model(ids, labels=ids)
    assert plain.aux_loss is None and plain.router_logits is None  # Mixtral's default: off
    out = model(ids, labels=ids, output_router_logits=True)
    ours = model.model(ids, targets=torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1))
    torch.testing.assert_close(out.aux_loss, ours.aux_loss)
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.aux_loss)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (20, 4)
    on = make_model(output_router_logits=True)  # the config's switch
    assert on(ids).aux_loss is not None and on(ids, output_router_logits=False).aux_loss is None
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1 must be a finite number >= 0"):
        SoftMoEConfig(router_aux_loss_coef=-1)
    with pytest.raises(TypeError, match="router_aux_loss_coef must be a float, got str '0.5'"):
        SoftMoEConfig(router_aux_loss_coef="0.5")
    with pytest.raises(TypeError, match=r"output_router_logits must be a bool, got int \(1\)"):
        SoftMoEConfig(output_router_logits=1)


def test_the_switch_survives_save_and_load(tmp_path):
    make_model(router_aux_loss_coef=0.25).save_pretrained(tmp_path)
    loaded = SoftMoEForCausalLM.from_pretrained(tmp_path, output_router_logits=True)  # as docs/library.md loads it
    assert loaded.config.output_router_logits is True and loaded.config.router_aux_loss_coef == 0.25
    assert loaded(torch.randint(0, 64, (1, 5))).aux_loss is not None


def test_aux_loss_reaches_the_router_gradients():
    grads = {}
    for coef in (0.0, 1.0):
        model = make_model(output_router_logits=True, router_aux_loss_coef=coef)
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        grads[coef] = [b.ffn.router.gate.weight.grad.clone() for b in model.model.blocks if b.is_moe]
    assert all(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[1.0]))


def train(tmp_path, name: str, activation_checkpointing: bool = False, **hf_options) -> SoftMoEForCausalLM:
    """3 steps of transformers.Trainer on 12 fixed random sequences; returns the trained model."""
    model = make_model(**hf_options)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 64, (16,), generator=gen) for _ in range(12)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, activation_checkpointing=activation_checkpointing)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert model.model.activation_checkpointing is activation_checkpointing
    return model


def test_trainer_trains_the_aux_loss(tmp_path):
    before = gates(make_model())
    off = gates(train(tmp_path, "off"))
    zero = gates(train(tmp_path, "zero", output_router_logits=True, router_aux_loss_coef=0.0))
    on = gates(train(tmp_path, "on", output_router_logits=True, router_aux_loss_coef=1.0))
    recomputed = gates(train(tmp_path, "ckpt", activation_checkpointing=True, output_router_logits=True,
                             router_aux_loss_coef=1.0))
    assert all(not torch.equal(a, b) for a, b in zip(before, off))  # the Trainer trained the gates
    assert all(torch.equal(a, b) for a, b in zip(off, zero))  # coef 0: the aux loss adds nothing
    assert all(not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(zero, on))  # coef 1: it is trained
    for a, b in zip(on, recomputed):  # Trainer's activation_checkpointing: GPT's per-block checkpointing, same result
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_routing_diagnostics_callback_logs_every_layer_in_a_trainer_run(tmp_path):
    """add_routing_diagnostics: per-layer k, realized AE, logit spread, kept weight and the interval's load reach the
    Trainer's logs (state.log_history) on every logging step, from the training forwards of that interval."""
    from softmoe.export.diagnostics import RoutingDiagnosticsCallback, add_routing_diagnostics

    model = make_model()
    gen = torch.Generator().manual_seed(2)
    data = [{"input_ids": r, "labels": r} for r in (torch.randint(0, 64, (16,), generator=gen) for _ in range(12))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "diag"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=2, seed=0,
        data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    callback = add_routing_diagnostics(trainer)
    assert isinstance(callback, RoutingDiagnosticsCallback) and trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    keys = ("k", "active_experts_mean", "logit_spread", "weight_sum_mean", "load_max_over_mean", "load_cv",
            "dead_fraction")
    for entry in logged:
        for block in (0, 1):
            for key in keys:
                assert isinstance(entry[f"softmoe/block{block}/{key}"], float), (block, key)
            assert entry[f"softmoe/block{block}/k"] == pytest.approx(1.5, abs=0.2)
            assert 1.0 <= entry[f"softmoe/block{block}/active_experts_mean"] <= 3.0  # m = ceil(2 k) = 3
            assert entry[f"softmoe/block{block}/logit_spread"] > 0
            assert 1.0 <= entry[f"softmoe/block{block}/load_max_over_mean"] <= 4.0
            assert 0.0 <= entry[f"softmoe/block{block}/dead_fraction"] <= 1.0
    assert callback._handle is None  # the hook is removed when training ends
    # the interval's forwards only: a new interval starts empty
    assert callback.summary() == {}
