"""transformers wrapper: config round trip, save/load exact, Auto classes, generate == ours, export CLI.

Run: .venv/bin/python -m pytest -q tests/unit/export/test_hf.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from softmoe.cli import main
from softmoe.model import ModelConfig, generate
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM, register
from softmoe.train.config import load_run_config
from softmoe.train.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                   k=1.5, max_seq_len=32)


@pytest.fixture(scope="module")
def model() -> SoftMoEForCausalLM:
    torch.manual_seed(0)
    return SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    return out


def test_config_converts_both_ways_and_validates():
    assert SoftMoEConfig.from_model_config(TINY).to_model_config() == TINY
    topk = ModelConfig(router="topk", k=2.0, moe_every=2, router_options={"lb_coef": 0.02})
    assert SoftMoEConfig.from_model_config(topk).to_model_config() == topk
    assert SoftMoEConfig().to_model_config() == ModelConfig()
    assert SoftMoEConfig(n_layers=3).num_hidden_layers == 3  # the name transformers' caches read
    with pytest.raises(ValueError, match="n_heads"):
        SoftMoEConfig(d_model=30, n_heads=4)


def test_save_load_round_trip_is_exact(model, saved):
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    loaded = SoftMoEForCausalLM.from_pretrained(saved).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Non-persistent RoPE tables are rebuilt after HF's meta-device load.
    assert torch.equal(loaded.model.rope_cos, model.model.rope_cos)
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_moved_threshold_round_trips_and_an_old_folder_loads_the_configured_one(model, tmp_path):
    from safetensors.torch import load_file, save_file

    routers = [m for m in model.modules() if hasattr(m, "threshold")]
    assert len(routers) == 2
    try:
        for r in routers:
            r.threshold.fill_(1.25)  # as the active-experts controller leaves it
        model.save_pretrained(tmp_path / "moved")
    finally:
        for r in routers:
            r.threshold.fill_(1.8)
    moved = SoftMoEForCausalLM.from_pretrained(tmp_path / "moved")
    assert [float(m.threshold) for m in moved.modules() if hasattr(m, "threshold")] == [1.25, 1.25]
    # a folder written before the buffer existed: no threshold entries in its weights
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("router.threshold")},
              tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "softmoe_manifest.json").unlink()  # such a folder also predates the manifest
    for _ in range(3):  # the uninitialised memory it used to get differs between loads
        old = SoftMoEForCausalLM.from_pretrained(tmp_path / "old")
        assert [float(m.threshold) for m in old.modules() if hasattr(m, "threshold")] == pytest.approx([1.8, 1.8])


def test_auto_classes_load_the_folder_after_register(model, saved):
    register()
    assert isinstance(AutoConfig.from_pretrained(saved), SoftMoEConfig)
    loaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert isinstance(loaded, SoftMoEForCausalLM)
    ids = torch.randint(0, TINY.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_logits_and_loss_match_gpt(model):
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    with torch.no_grad():
        ours = model.model(ids[:, :-1], targets=ids[:, 1:])
        hf = model(ids[:, :-1], labels=ids[:, :-1].clone())
        hf_full = model(ids, labels=ids)
    assert torch.equal(hf.logits, ours.logits)
    assert torch.allclose(hf_full.loss, ours.loss, atol=1e-6)  # same targets: the HF shift == our targets


def test_greedy_generate_equals_ours_and_uses_the_cache(model):
    prompt = torch.randint(0, TINY.vocab_size, (2, 5))
    seen = []
    hook = model.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(out, generate(model.model, prompt, 10, temperature=0.0))
    assert seen == [5] + [1] * 9  # prefill once, then one cached token per step


def test_sampling_generate_runs(model):
    torch.manual_seed(1)
    out = model.generate(torch.randint(0, TINY.vocab_size, (2, 4)), max_new_tokens=6, min_new_tokens=6,
                         do_sample=True, top_p=0.9, temperature=0.8)
    assert out.shape == (2, 10) and int(out.max()) < TINY.vocab_size


def test_mask_with_a_hole_is_rejected(model):
    # Left and right padding work (tests/unit/export/test_hf_padding.py); a 0 between 1s does not.
    ids = torch.randint(0, TINY.vocab_size, (2, 4))
    with pytest.raises(ValueError, match="attention_mask row 0 has a 0 between 1s"):
        model(ids, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Trainer, Path]:
    """(the trainer of a 2-step tiny run, its checkpoint exported with `softmoe export`)."""
    tmp_path = tmp_path_factory.mktemp("export")
    config = load_run_config(CONFIGS / "tiny" / "softmoe.yaml", [
        f"train.out_dir={tmp_path / 'runs'}", f"data.data_dir={tmp_path / 'data'}", "train.steps=2",
        "train.ckpt_every=2", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
        "train.tensorboard=false"])
    trainer = Trainer(config, report=lambda _m: None)
    trainer.fit()
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(config.train.run_dir), "--out", str(out)]) == 0
    return trainer, out


def test_export_cli_on_a_tiny_trained_checkpoint(exported, tmp_path):
    trainer, out = exported
    config = trainer.config

    loaded = SoftMoEForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.model_max_length == config.model.max_seq_len
    batch = tok(["Four score", "and seven years ago"], padding=True, return_tensors="pt")  # needs a pad token
    assert batch.attention_mask.shape == batch.input_ids.shape and not bool(batch.attention_mask.all())
    want = trainer.model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.model.state_dict().items())
    prompt = torch.tensor([tok("Four score and").input_ids])
    trainer.model.eval()
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False),
                       generate(trainer.model, prompt, 5, temperature=0.0))
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # nothing half-written


def test_exported_folder_is_verified_on_load(exported, tmp_path):
    """Every file's sha256 is in softmoe_manifest.json; SoftMoEForCausalLM.from_pretrained (and the Auto classes,
    which call it) refuse a flipped byte in the weights, which transformers alone loads silently."""
    import json
    import shutil

    from softmoe.export.manifest import MANIFEST, ExportIntegrityError, verify_export

    _, out = exported
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert set(listed) == {p.name for p in out.iterdir()} - {MANIFEST}
    assert verify_export(out) == sorted(listed)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # inside the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match="model.safetensors: sha256"):
        SoftMoEForCausalLM.from_pretrained(damaged)
    register()
    with pytest.raises(ExportIntegrityError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(damaged)
    shutil.copy2(out / "model.safetensors", weights)
    assert SoftMoEForCausalLM.from_pretrained(damaged) is not None
    (damaged / "tokenizer.json").unlink()  # not read by the model load; verify_export checks every listed file
    with pytest.raises(ExportIntegrityError, match="tokenizer.json: listed in"):
        verify_export(damaged)


@pytest.mark.parametrize("code", [
    # docs/library.md: trust_remote_code on both Auto calls, no softmoe import
    "tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)\n"
    "model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)",
    # the model first: its remote code registers the classes, so the tokenizer needs nothing more
    "model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)\n"
    "tok = AutoTokenizer.from_pretrained(out)",
])  # (softmoe.register_hf() then plain Auto calls: test_auto_classes_load_the_folder_after_register)
def test_documented_auto_loading_neither_prompts_nor_warns(exported, code):
    """In a fresh process with no stdin: no "[y/N]" question from transformers, no model-type warning."""
    import subprocess
    import sys

    _, out = exported
    script = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\nout = {str(out)!r}\n{code}\n"
              "print(type(model).__name__, type(tok).__name__, tok('four score').input_ids)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("SoftMoEForCausalLM "), proc.stdout
    text = proc.stdout + proc.stderr
    assert "[y/N]" not in text and "model of type" not in text, text
