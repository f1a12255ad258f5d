"""Retrofit of transformers MoE models (softmoe.convert): equivalence at small alpha, gradients, budget,
save / reload, the `softmoe convert` CLI and bad input. Tiny random configs, no download.

Tiny random configs of all three classes (2 layers, hidden 32, 8 experts, top-2; Qwen2-MoE with
`norm_topk_prob=False` and its shared expert, OLMoE with `norm_topk_prob=True`):
    - blocks replaced with the same weights and names;
    - logits, HF aux loss and greedy generate equal within 1e-5 at alpha <= margin / 40;
    - positions before the first near-threshold token equal at alpha 1e-4 and 1e-3;
    - per-token soft weights within the sqrt(E - k) e^(-delta / (2 alpha)) bound;
    - budget k_l = the original k, and mean k_l = k after moving theta;
    - gradients reach theta, log alpha, the gates and the experts;
    - save / reload exact; `softmoe convert` on a saved tiny model;
    - errors for a non-module, a model without MoE blocks, an unsupported block (`Qwen3MoeSparseMoeBlock`),
      unknown options, out-of-range alpha / budget, a bad combine, an already converted model and a folder
      without the config entry.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:xdist tests/unit/convert/test_from_hf.py
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

from softmoe.cli import main
from softmoe.convert import from_hf, from_pretrained, soft_blocks
from softmoe.convert.blocks import SoftRoutedBlock

pytestmark = pytest.mark.usefixtures("one_thread")

E, K, VOCAB = 8, 2, 64
# initializer_range 0.2 gives router logits of std ~1 (hidden 32), the scale of a trained router; HF's
# default 0.02 would give logits of std ~0.1 and ten times smaller top-k margins.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.2, eos_token_id=0, bos_token_id=0, pad_token_id=0)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=48, num_local_experts=E, num_experts_per_tok=K, **COMMON)
        return MixtralForCausalLM(config).eval()
    if family == "qwen2_moe":  # norm_topk_prob=False (its default): raw top-k softmax mass, plus the shared expert
        config = Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                num_experts=E, num_experts_per_tok=K, norm_topk_prob=False, **COMMON)
        return Qwen2MoeForCausalLM(config).eval()
    config = OlmoeConfig(intermediate_size=48, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, **COMMON)
    return OlmoeForCausalLM(config).eval()


FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
COMBINE = {"mixtral": "mask_softmax", "qwen2_moe": "mask_softmax_raw", "olmoe": "mask_softmax"}


@pytest.fixture(scope="module", params=FAMILIES)
def original(request):
    return request.param, tiny(request.param)


def ids(batch: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def margins(router_logits: tuple[torch.Tensor, ...], batch: int) -> torch.Tensor:
    """(B, S) smallest top-k margin (k-th minus (k+1)-th router logit) of each token over layers."""
    per_layer = [lg.float().sort(dim=-1, descending=True).values for lg in router_logits]
    gap_LT = torch.stack([s[:, K - 1] - s[:, K] for s in per_layer])
    return gap_LT.min(dim=0).values.reshape(batch, -1)


# --------------------------------------------------------------------------------------------
# Equivalence before training
# --------------------------------------------------------------------------------------------


def test_blocks_are_replaced_and_weights_reused(original):
    family, model = original
    before = model.state_dict()
    converted = copy.deepcopy(model)
    ptrs = [m.mlp.experts.gate_up_proj.data_ptr() for m in converted.model.layers]
    assert from_hf(converted) is converted  # in place
    blocks = soft_blocks(converted)
    assert [b.index for b in blocks] == [0, 1]
    assert all(isinstance(m.mlp, SoftRoutedBlock) for m in converted.model.layers)
    assert blocks[0].rule.combine == COMBINE[family]
    assert [b.experts.gate_up_proj.data_ptr() for b in blocks] == ptrs  # the same tensors, not copies
    # Same values under the same state dict names, plus only the softmoe_retrofit.* entries.
    after = converted.state_dict()
    assert set(after) - set(before) == {"softmoe_retrofit.budget.theta", "softmoe_retrofit.budget.budget",
                                        "softmoe_retrofit.budget.pinned", "softmoe_retrofit.budget.pinned_k_L",
                                        "softmoe_retrofit.log_alpha_L"}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_logits_match_when_every_margin_is_large(original):
    """alpha = (smallest top-k margin in the batch) / 40: every soft weight is its hard value to fp32 rounding."""
    _, model = original
    x = ids()
    with torch.no_grad():
        ref = model(x, output_router_logits=True)
        alpha = float(margins(ref.router_logits, x.shape[0]).min()) / 40
        out = from_hf(copy.deepcopy(model), alpha=alpha)(x, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    # transformers' own aux-loss path still sees the router logits of every converted block.
    assert len(out.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1e-4, 1e-3])
def test_logits_match_before_the_first_near_threshold_token(original, alpha):
    """At a fixed small alpha only tokens with a top-k margin < 40 alpha get soft weights (or keep an
    extra expert); the model is causal, so every position before the first such token matches exactly."""
    _, model = original
    x = ids(batch=6, length=32)
    with torch.no_grad():
        ref = model(x, output_router_logits=True)
        out = from_hf(copy.deepcopy(model), alpha=alpha)(x)
    near_BS = margins(ref.router_logits, x.shape[0]) < 40 * alpha
    checked = 0
    for row in range(x.shape[0]):
        first = int(near_BS[row].nonzero()[0]) if bool(near_BS[row].any()) else x.shape[1]
        torch.testing.assert_close(out.logits[row, :first], ref.logits[row, :first], atol=1e-5, rtol=0)
        checked += first
    assert checked > 0


def test_soft_weights_approach_hard_top_k_with_the_margin():
    """Per token: |w_soft - w_hard| <= sqrt(E - k) exp(-margin / (2 alpha)) once truncation drops the rest
    (the threshold sits at least (margin - alpha ln(E - k)) / 2 from both the k-th and (k+1)-th score)."""
    model = from_hf(tiny("mixtral"), alpha=0.01)
    block = soft_blocks(model)[0]
    logits_TE = torch.randn(4000, E, generator=torch.Generator().manual_seed(0))
    k, alpha = torch.tensor(float(K)), torch.tensor(0.01)
    dense = block.route(logits_TE, k, alpha).routing.dense_weights()
    top = logits_TE.softmax(-1).topk(K, dim=-1)
    hard = torch.zeros_like(dense).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    s = logits_TE.sort(-1, descending=True).values
    margin = s[:, K - 1] - s[:, K]
    bound = math.sqrt(E - K) * torch.exp(-margin / (2 * alpha))
    truncated = (dense > 0).sum(-1) == K
    err = (dense - hard).abs().max(-1).values
    assert bool((err[truncated] <= bound[truncated] + 1e-6).all())
    assert float(truncated.float().mean()) > 0.9  # the rest are tokens with margin < ~4.6 alpha


def test_generate_matches_at_large_margins():
    model = tiny("olmoe")
    prompt = ids(batch=1, length=6, seed=3)
    converted = from_hf(copy.deepcopy(model), alpha=1e-7)
    want = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(converted.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False), want)


# --------------------------------------------------------------------------------------------
# Budget and gradients
# --------------------------------------------------------------------------------------------


def test_budget_starts_at_the_original_top_k_and_stays_there(original):
    converted = from_hf(copy.deepcopy(original[1]), budget_mode="exact")
    budget = converted.softmoe_retrofit.budget
    assert budget().tolist() == [float(K)] * 2 and float(budget.budget) == K
    with torch.no_grad():
        budget.theta.copy_(torch.tensor([1.0, -0.7]))
    k_L = budget().detach()
    assert abs(float(k_L.mean()) - K) < 1e-6 and float(k_L[0]) > float(k_L[1])
    assert not any(hasattr(b, "stats") or hasattr(b, "aux_loss") for b in soft_blocks(converted))


def test_gradients_reach_k_l_alpha_and_the_gate(original):
    converted = from_hf(copy.deepcopy(original[1]), alpha=0.3, learn_alpha=True).train()
    x = ids(batch=2, length=16)
    with converted.softmoe_retrofit.collect() as routing:
        loss = converted(x, labels=x).loss
    loss.backward()
    state = converted.softmoe_retrofit
    for name, param in [("theta", state.budget.theta), ("log_alpha_L", state.log_alpha_L),
                        *[(f"gate{b.index}", b.gate.weight) for b in soft_blocks(converted)],
                        *[(f"experts{b.index}", b.experts.gate_up_proj) for b in soft_blocks(converted)]]:
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name
        assert float(param.grad.abs().max()) > 0, name
    # Each block reports its realized routing to the collect() scope, in call order.
    assert [index for index, _ in routing.layers] == [0, 1]
    stats = routing.stats[0]
    assert stats["k"] == pytest.approx(K) and stats["active_experts_mean"] >= 1.0
    assert routing.aux_loss.dim() == 0  # lb_coef = z_coef = 0 by default: the retrofit adds no aux loss


# --------------------------------------------------------------------------------------------
# Save / reload, CLI
# --------------------------------------------------------------------------------------------


def test_save_reload_round_trip_is_exact(original, tmp_path):
    converted = from_hf(copy.deepcopy(original[1]), alpha=0.05, learn_alpha=True)
    with torch.no_grad():  # as after a fine-tune: moved allocation, alpha and gate
        converted.softmoe_retrofit.budget.theta.copy_(torch.tensor([0.4, -0.4]))
        converted.softmoe_retrofit.log_alpha_L.add_(torch.tensor([0.2, -0.1]))
        soft_blocks(converted)[1].gate.weight.mul_(1.1)
    converted.softmoe_retrofit.budget.set_budget(1.5)
    converted.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["softmoe_retrofit"]
    assert entry["version"] == 1 and entry["budget"] == K and entry["alpha"] == 0.05

    loaded = from_pretrained(tmp_path).eval()
    want, got = converted.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert float(loaded.softmoe_retrofit.budget.budget) == 1.5
    x = ids(batch=2, length=12)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, converted(x).logits)

    # Plain transformers loading gives the original architecture; from_hf then refuses (k_l, alpha were dropped).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not soft_blocks(plain)
    with pytest.raises(ValueError, match="softmoe_retrofit.*from_pretrained"):
        from_hf(plain)


def test_cli_convert_on_a_saved_tiny_model(tmp_path, capsys):
    model = tiny("qwen2_moe")
    src, out = tmp_path / "hf", tmp_path / "soft"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    assert main(["convert", "--checkpoint", str(src), "--out", str(out), "--alpha", "0.02", "--budget", "1.5"]) == 0
    assert "converted 2 Qwen2MoeForCausalLM MoE blocks" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_text() == "{}"
    loaded = from_pretrained(out).eval()
    assert loaded.softmoe_retrofit.budget().tolist() == [1.5, 1.5]
    expected = from_hf(copy.deepcopy(model), alpha=0.02, budget=1.5)
    x = ids(batch=2, length=10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected(x).logits, atol=1e-6, rtol=0)
    assert main(["convert", "--checkpoint", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "missing" in err, err  # the flag the user typed, not its old name
    assert main(["convert", "--model", str(src), "--out", str(out), "--alpha", "0"]) == 2
    assert "alpha=0.0" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "-1"], "--alpha=-1.0"),
    (["--budget", "9"], "--budget=9.0"),
    (["--threshold", "-1"], "--threshold=-1.0"),
    (["--max-active", "0"], "--max-active=0"),
    (["--min-weight", "2"], "--min-weight=2.0"),
])
def test_cli_convert_checks_its_options_before_loading_the_weights(tmp_path, capsys, monkeypatch, flags, message):
    """A large model takes minutes to load: a bad flag must be refused first, and nothing written."""
    src = tmp_path / "hf"
    tiny("olmoe").save_pretrained(src)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(src), "--out", str(tmp_path / "soft"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--checkpoint" not in err, err  # the flag at fault only
    assert not (tmp_path / "soft").exists()


def test_cli_convert_refuses_other_models_and_a_used_out_folder(tmp_path, capsys):
    from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM
    from softmoe.model import ModelConfig

    exported, llama = tmp_path / "exported", tmp_path / "llama"
    SoftMoEForCausalLM(SoftMoEConfig.from_model_config(ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, num_experts=4, d_expert=16, k=2.0,
        max_seq_len=16))).save_pretrained(exported)
    LlamaForCausalLM(LlamaConfig(intermediate_size=48, **COMMON)).save_pretrained(llama)
    assert main(["convert", "--checkpoint", str(exported), "--out", str(tmp_path / "a")]) == 2
    assert "an exported softmoe model" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(llama), "--out", str(tmp_path / "b")]) == 2
    assert "a 'llama' model" in capsys.readouterr().err
    src, used = tmp_path / "hf", tmp_path / "used"
    tiny("mixtral").save_pretrained(src)
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["convert", "--checkpoint", str(src), "--out", str(used)]) == 2
    assert "is not empty" in capsys.readouterr().err and (used / "notes.txt").read_text() == "mine"
    (used / "notes.txt").unlink()  # an empty folder is fine
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: the CLI turns transformers' bars off off a terminal
    assert main(["convert", "--checkpoint", str(src), "--out", str(used)]) == 0
    assert "shards" not in capsys.readouterr().err
    assert (used / "config.json").is_file() and not list(tmp_path.glob(".used.*"))  # no staging left behind


def test_cli_defaults_are_the_retrofit_defaults():
    """The parser spells RetrofitConfig's defaults out (building it must not import torch): they must agree."""
    from softmoe.cli.convert import DEFAULTS
    from softmoe.convert.retrofit import RetrofitConfig

    assert DEFAULTS == {name: getattr(RetrofitConfig, name) for name in DEFAULTS}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_not_an_moe_model_or_unknown_block_is_named():
    with pytest.raises(TypeError, match="got str"):
        from_hf("mixtral")
    with pytest.raises(ValueError, match="no MoE block found in Linear"):
        from_hf(nn.Linear(2, 2))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="no MoE block found in LlamaForCausalLM"):
        from_hf(llama)
    qwen3 = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                               moe_intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="unsupported MoE block Qwen3MoeSparseMoeBlock at model.layers.0.mlp"):
        from_hf(qwen3)


def test_bad_options_are_named(tmp_path):
    model = tiny("mixtral")
    with pytest.raises(ValueError, match="alpha=0"):
        from_hf(copy.deepcopy(model), alpha=0.0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\]"):
        from_hf(copy.deepcopy(model), temperature=1.0)
    with pytest.raises(ValueError, match="budget=8"):
        from_hf(copy.deepcopy(model), budget=8.0)
    with pytest.raises(ValueError, match="combine='mean'"):
        from_hf(copy.deepcopy(model), combine="mean")
    with pytest.raises(TypeError, match="learn_k must be a bool"):
        from_hf(copy.deepcopy(model), learn_k=1)
    converted = from_hf(copy.deepcopy(model))
    with pytest.raises(ValueError, match="already converted"):
        from_hf(converted)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'softmoe_retrofit' entry"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a local folder"):
        from_pretrained(tmp_path / "missing")
