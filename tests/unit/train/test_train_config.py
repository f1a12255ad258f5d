"""RunConfig loading: YAML sections, unknown keys rejected, dotted overrides, validation errors.

Run: .venv/bin/python -m pytest -q tests/unit/train/test_train_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from softmoe.train.config import TrainConfig, apply_overrides, load_run_config, run_config_from_dict, same_config

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "tiny" / "softmoe.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_and_overrides(tmp_path):
    path = write(tmp_path, "model: {d_model: 64, n_heads: 4}\ntrain: {lr: 3e-4, steps: 10}\n")
    cfg = load_run_config(path, ["train.lr=1e-3", "model.n_layers=2", "model.router_options.alpha=0.3"])
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 2
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.model.router_options.changed() == {"alpha": 0.3}  # typed, built once at parse time
    assert cfg.train.steps == 10


def test_yaml_numbers_in_the_options_are_read_once_at_the_config_edge(tmp_path):
    """YAML 1.1 reads `1e-3` as a string: the loader reads it as the float the option declares, so the typed
    options (and routing/) only ever hold numbers; dotted overrides of both option sets keep working."""
    path = write(tmp_path, "model: {router: remoe, k: 1, router_options: {lambda_init: 1e-3}}\n")
    cfg = load_run_config(path, ["model.router_options.gate_noise=1e-2", "model.budget_options.realized_rate=5e-2"])
    assert cfg.model.router_options.lambda_init == 1e-3 and cfg.model.router_options.gate_noise == 1e-2
    assert type(cfg.model.router_options).__name__ == "ReMoEOptions"
    assert cfg.model.budget_options.realized_rate == 0.05
    soft = load_run_config(write(tmp_path, "model: {router: softmoe}\n"),
                           ["model.router_options.gate_noise=0.1", "model.budget_options.realized=true"])
    assert soft.model.router_options.gate_noise == 0.1 and soft.model.budget_options.realized is True
    with pytest.raises(ValueError, match=r"model\.router_options\.alpha='soft' must be a number"):
        load_run_config(None, ["model.router_options.alpha=soft"])
    # the saved form is a plain dict with every option, and it loads back to the same typed options
    raw = soft.to_dict()
    assert raw["model"]["router_options"]["gate_noise"] == 0.1 and raw["model"]["budget_options"]["realized"] is True
    assert run_config_from_dict(raw) == soft


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("train: {lrr: 1.0}\n", [], r"unknown config key train\.lrr \(did you mean train\.lr\?\)"),
        ("optimizer: {}\n", [], "unknown config section"),
        ("", ["train.lr"], "section.key=value"),
        ("", ["lr=3"], "section.key=value"),
        ("", ["trainer.lr=3"], "unknown section 'trainer'"),
        ("", ["model.n_layer=3"], r"model\.n_layer"),
        ("", ["train.lr=fast"], r"train\.lr='fast' must be a number"),
        ("", ["train.precision=fp8"], "precision='fp8'"),
        ("", ["train.steps=0"], r"train\.steps=0"),
        ("", ["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len=512 exceeds"),
        ("model: [1, 2]\n", [], "must be a mapping"),
        ("", ["model.router_options.temperature=0.5"], r"unknown option\(s\) \['temperature'\] .*temperature=0\.5"),
        ("", ["model.budget_options.mood=exact"], r"unknown option\(s\) \['mood'\] for model\.budget_options"),
    ],
)
def test_bad_configs_raise_value_error(tmp_path, text, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_run_config(write(tmp_path, text), overrides)


def test_missing_file_and_type_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(TypeError, match="train.steps"):
        TrainConfig(steps=2.5)


@pytest.mark.parametrize("changes, error, match", [
    (dict(steps=0), ValueError, r"train\.steps=0 must be an int >= 1"),
    (dict(seed=-1), ValueError, r"train\.seed=-1 must be an int in \[0, 9223372036854775807\]"),
    (dict(seed=2**64), ValueError, r"train\.seed=18446744073709551616 must be an int in"),
    (dict(eps=0.0), ValueError, r"train\.eps=0\.0 must be a finite number > 0"),
    (dict(keep_last=True), TypeError, r"train\.keep_last=True must be an int >= 1"),
    (dict(lr=0), ValueError, r"train\.lr=0 must be a finite number > 0"),
    (dict(lr=float("inf")), ValueError, r"train\.lr=inf must be a finite number"),
    (dict(min_lr_ratio=1.5), ValueError, r"train\.min_lr_ratio=1\.5 must be a finite number in \[0, 1\]"),
    (dict(beta2=-0.1), ValueError, r"train\.beta2=-0\.1 must be a finite number in \[0, 1\]"),
    (dict(grad_clip=-1.0), ValueError, r"train\.grad_clip=-1\.0 must be a finite number >= 0"),
    (dict(weight_decay="0.1"), TypeError, r"train\.weight_decay must be a float, got str '0\.1'"),
    (dict(ae_k_max=None), TypeError, r"train\.ae_k_max must be a float, got NoneType None"),
    (dict(compile=1), TypeError, r"train\.compile must be a bool, got int \(1\)"),
    (dict(activation_checkpointing="yes"), TypeError, r"train\.activation_checkpointing must be a bool, got str"),
    (dict(progress="false"), TypeError, r"train\.progress must be a bool, got str"),
    (dict(tensorboard=0), TypeError, r"train\.tensorboard must be a bool, got int \(0\)"),
    (dict(ae_target=2.0, ae_lever="K"), ValueError, r"train\.ae_lever='K' must be one of \('threshold', 'budget'\)"),
    (dict(ae_lever="K"), ValueError, r"train\.ae_lever='K' must be one of \('', 'threshold', 'budget'\)"),
    (dict(precision="fp16"), ValueError, r"train\.precision='fp16' must be one of \('fp32', 'bf16'\)"),
])
def test_train_config_errors_name_the_field_and_the_value(changes, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**changes)


def test_round_trip_through_dict():
    cfg = load_run_config(None, ["model.d_model=64", "train.name=x"])
    assert run_config_from_dict(cfg.to_dict()) == cfg


def test_overrides_do_not_mutate_input():
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2.0"])
    assert raw == {"train": {"lr": 1.0}}


def test_every_shipped_preset_loads():
    # configs/<size>/<variant>.yaml are run presets; configs/studies/ holds study files (tested with compare)
    presets = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "studies")
    assert presets, "configs/ has no presets"
    for path in presets:
        load_run_config(path)


def test_same_config_fills_defaults_of_fields_added_since_a_run_was_saved():
    config = load_run_config(TINY)
    saved = config.to_dict()
    del saved["model"]["granularity"], saved["model"]["num_shared_experts"]  # a run saved before they existed
    assert same_config(saved, config)
    assert same_config(saved, config, sections=("model",))
    changed = load_run_config(TINY, ["model.num_shared_experts=1"])
    assert not same_config(saved, changed)
    assert same_config(saved, load_run_config(TINY, ["train.lr=0.5"]), sections=("model",))
    assert not same_config(saved, load_run_config(TINY, ["train.lr=0.5"]))
    assert not same_config({"model": {"no_such_field": 1}}, config)  # unreadable: never the same


def test_the_largest_data_seed_has_a_validation_seed():
    """data.seed accepts up to 2**63 - 1; the validation loader's derived seed once overflowed that range there
    (an error naming a seed the user never gave)."""
    from softmoe.data.loader import window_offsets
    from softmoe.train.data import VAL_SEED_OFFSET, val_seed

    assert val_seed(0) == VAL_SEED_OFFSET
    largest = 2**63 - 1
    assert 0 <= val_seed(largest) < 2**63 and val_seed(largest) != largest
    assert len(window_offsets(val_seed(largest), 0, 4, 100)) == 4  # the loader takes it
