"""SoftMoEBudget: one learned global budget over SoftMoE layers dropped into a model we do not own (a random
tiny transformers Llama, no download), in the dozen lines docs/library.md shows; results come from collect().

Run: .venv/bin/python -m pytest -q tests/unit/layers/test_budgeted.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import softmoe
from softmoe.routing.budget import Budget

transformers = pytest.importorskip("transformers")

D, H, E, LAYERS, VOCAB = 32, 32, 4, 2, 64


def llama_with_softmoe(budget_mode: str = "exact", realized: bool = False):
    """docs/library.md's drop-in, verbatim apart from the tiny sizes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    budget = softmoe.SoftMoEBudget(num_layers=LAYERS, num_experts=E, budget=2.0, mode=budget_mode, realized=realized)
    for block in model.model.layers:
        block.mlp = budget.attach(softmoe.MoELayer(D, H, num_experts=E, router="softmoe", k=2.0))
    model.softmoe_budget = budget
    return model, budget


def test_llama_trains_with_the_learned_budget_and_aux_loss():
    model, budget = llama_with_softmoe()
    assert sum(p is budget.theta for p in model.parameters()) == 1  # registered once: the optimizer sees it
    assert "softmoe_budget.theta" in model.state_dict()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    losses, theta_before = [], budget.theta.detach().clone()
    for step in range(6):
        with budget.collect() as routing:
            out = model(input_ids=ids, labels=ids)
        assert [index for index, _ in routing.layers] == [0, 1]
        assert float(routing.aux_loss.detach()) > 0 and routing.aux_loss.requires_grad
        assert [float(routing.stats[i]["k"]) for i in range(LAYERS)] == pytest.approx(budget().tolist())
        loss = out.loss + routing.aux_loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # Gradients reach the budget's theta (through k_l), every gate and every expert bank.
            assert float(budget.theta.grad.abs().sum()) > 0
            for block in model.model.layers:
                moe = block.mlp.moe
                for name, p in [("gate", moe.router.gate.weight), ("w_up", moe.experts.w_up)]:
                    assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.3, losses
    k_L = budget().detach()
    assert not torch.equal(budget.theta.detach(), theta_before)  # the allocation moved ...
    assert float(k_L.mean()) == pytest.approx(2.0, abs=1e-5)  # ... under the global budget (exact mode)


def test_aux_loss_reaches_the_gate():
    """The aux loss alone (load balance + z-loss) gives the gates a gradient: it is not dropped on the way."""
    model, budget = llama_with_softmoe()
    ids = torch.randint(0, VOCAB, (2, 8))
    with budget.collect() as routing:
        model(input_ids=ids)
    routing.aux_loss.backward()
    assert all(float(b.mlp.moe.router.gate.weight.grad.abs().sum()) > 0 for b in model.model.layers)


def test_penalty_mode_adds_the_penalty_once_per_scope():
    model, budget = llama_with_softmoe("penalty")
    with torch.no_grad():
        budget.theta.add_(1.0)  # mean k_l above K: a positive penalty
    ids = torch.randint(0, VOCAB, (2, 8))
    with budget.collect() as routing:
        model(input_ids=ids)
    layers = sum(float(r.aux_loss.detach()) for _, r in routing.layers)
    assert float(budget.penalty().detach()) > 0
    assert float(routing.aux_loss.detach()) == pytest.approx(layers + float(budget.penalty().detach()), rel=1e-6)


def test_hf_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, budget = llama_with_softmoe()
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
        with budget.collect() as routing:
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + routing.aux_loss
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the recomputation in backward, outside the scope, does not warn
            loss.backward()
        assert len(routing.layers) == LAYERS  # read before backward: the recomputation is not in it
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_training_forward_before_any_scope_warns_and_results_are_not_attributes():
    model, budget = llama_with_softmoe()
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.warns(UserWarning, match="outside `with budget.collect\\(\\)`") as caught:
        model(input_ids=ids)
    assert "torch" not in Path(caught[0].filename).parts  # points at the code that called the FFN, not torch's
    layer = model.model.layers[0].mlp
    assert not hasattr(layer, "aux_loss") and not hasattr(layer.moe, "stats")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # inference: nothing to warn about


def test_attach_checks_the_layer_and_the_index():
    budget = softmoe.SoftMoEBudget(num_layers=2, num_experts=E, budget=2.0)
    assert isinstance(budget, Budget)
    with pytest.raises(ValueError, match="takes no budget"):
        budget.attach(softmoe.MoELayer(D, H, num_experts=E, router="topk", k=2.0))
    with pytest.raises(ValueError, match="routes over 8 experts but the budget has num_experts=4"):
        budget.attach(softmoe.MoELayer(D, H, num_experts=8, router="softmoe", k=2.0))
    layer = lambda: softmoe.MoELayer(D, H, num_experts=E, router="softmoe", k=2.0)  # noqa: E731
    assert [budget.attach(layer()).index for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match=r"index=2 must be an int in \[0, num_layers=2\)"):
        budget.attach(layer())
    with pytest.raises(TypeError, match="index=1.0 must be an int"):
        budget.attach(layer(), index=1.0)
    with pytest.raises(RuntimeError, match="do not nest"):
        with budget.collect(), budget.collect():
            pass


def test_a_layer_k_the_budget_overrides_is_refused():
    """Attached, a layer routes with the budget's k_l: a different k of its own would be silently ignored."""
    budget = softmoe.SoftMoEBudget(num_layers=2, num_experts=E, budget=1.5)
    with pytest.raises(ValueError, match="layer k=3 differs from the budget's K=1.5"):
        budget.attach(softmoe.MoELayer(D, H, num_experts=E, router="softmoe", k=3.0))
    with pytest.raises(ValueError, match="learn_k=True"):
        budget.attach(softmoe.MoELayer(D, H, num_experts=E, router="softmoe", k=1.5, learn_k=True))
    assert budget.attach(softmoe.MoELayer(D, H, num_experts=E, router="softmoe", k=1.5)).index == 0


def test_a_realized_budget_makes_each_layer_use_its_k_l_experts():
    """docs/library.md's realized-count example: after the optimizer step, routing.steer() moves every layer's
    threshold so its realized count follows its k_l (the paper's rule alone keeps ~1 expert here)."""
    model, budget = llama_with_softmoe(realized=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    first = None
    for _ in range(40):
        with budget.collect() as routing:
            out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        (out.loss + routing.aux_loss).backward()
        opt.step()
        routing.steer()
        first = routing.active_L() if first is None else first
    assert float(first.mean()) < 1.5  # before steering: the paper's rule keeps few experts
    assert torch.allclose(routing.active_L().float(), budget().detach(), atol=0.15), (routing.active_L(), budget())
    with pytest.raises(ValueError, match="realized=True"):
        llama_with_softmoe()[1].collect().__enter__().steer()


def test_routing_after_step_moves_the_attached_routers_bias():
    budget = softmoe.SoftMoEBudget(num_layers=1, num_experts=4, budget=2.0)
    layer = budget.attach(softmoe.MoELayer(16, 32, 4, router="softmoe", k=2.0, loss_free_bias=True))
    with torch.no_grad():
        layer.moe.router.gate.weight[0] += 2.0
    with budget.collect() as routing:
        layer(torch.randn(2, 8, 16))
    assert layer.moe.router.balance.bias_E.abs().sum() == 0
    routing.after_step()
    assert layer.moe.router.balance.bias_E.abs().sum() > 0


def test_a_layer_is_attached_once():
    budget = softmoe.SoftMoEBudget(num_layers=2, num_experts=4, budget=2.0)
    layer = softmoe.MoELayer(16, 32, 4, router="softmoe", k=2.0)
    budget.attach(layer)
    with pytest.raises(ValueError, match="attached already"):
        budget.attach(layer)
