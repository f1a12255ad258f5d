"""Migrations (softmoe/common/migrations.py): one test per migrated format, each from a small hand-written
example of the old format. The end-to-end loads of old files are tested beside their loaders too:
tests/unit/export/test_hf.py (an exported folder without the threshold) and
tests/unit/parallel/test_sharded_checkpoint_compat.py (a DCP checkpoint without it).

Run: .venv/bin/python -m pytest -q tests/unit/common/test_migrations.py
"""

from __future__ import annotations

import pytest
import torch
import yaml

from softmoe.common import migrations

# A run's config.yaml as written on 2026-12-01: the then-default lever without a target, router options as the
# subset that was set (today's files list every option), a YAML 1.1 exponent string, no `parallel` section.
OLD_CONFIG_YAML = """\
model: {vocab_size: 64, d_model: 16, n_layers: 2, n_heads: 2, d_ff: 32, num_experts: 8, d_expert: 16,
        router: softmoe, k: 2.0, router_options: {alpha: 1.0, bias_update_rate: 1e-3},
        budget_options: {mode: exact}}
data: {seq_len: 16}
train: {steps: 4, lr: 3e-3, ae_lever: threshold}
"""


def test_an_old_run_config_loads_and_equals_todays():
    from softmoe.train.config import RunConfig, run_config_from_dict, same_config

    raw = yaml.safe_load(OLD_CONFIG_YAML)
    migrated = migrations.run_config(raw)
    assert migrated["train"]["ae_lever"] == "" and raw["train"]["ae_lever"] == "threshold"  # a copy
    assert migrations.run_config({"train": {"ae_target": 2.0, "ae_lever": "budget"}})["train"]["ae_lever"] == "budget"
    config = run_config_from_dict(raw)
    assert isinstance(config, RunConfig) and config.train.ae_lever == ""
    assert config.model.router_options.bias_update_rate == 1e-3  # the YAML string read as a number
    assert config.model.budget_options.mode == "exact"
    # the saved dict and today's fully resolved form describe the same run
    assert same_config(raw, config) and run_config_from_dict(config.to_dict()) == config


def test_an_old_router_state_dict_gets_the_configured_threshold():
    from softmoe.routing import build_router

    old = {"gate.weight": torch.randn(8, 16), "log_alpha": torch.tensor(0.0)}  # from before the threshold buffer
    state = dict(old)
    migrations.router_state(state, "", 1.8)
    assert set(state) == {"gate.weight", "log_alpha", "threshold"} and float(state["threshold"]) == pytest.approx(1.8)
    kept = {"threshold": torch.tensor(0.7)}
    migrations.router_state(kept, "", 1.8)
    assert float(kept["threshold"]) == pytest.approx(0.7)  # a saved threshold is never replaced
    router = build_router("softmoe", 16, 8, 2.0, threshold=1.5)
    router.threshold.fill_(0.25)
    router.load_state_dict(old)  # strict: the router's pre-hook applies the migration
    assert float(router.threshold) == pytest.approx(1.5) and torch.equal(router.gate.weight, old["gate.weight"])


def test_an_old_sharded_checkpoint_leaves_out_only_the_added_state():
    model_dcp = {"blocks.0.ffn.router.threshold": 1, "blocks.0.ffn.router.gate.weight": 2, "embed.weight": 3}
    old_keys = {"model.blocks.0.ffn.router.gate.weight", "model.embed.weight"}  # written before the buffer
    assert migrations.sharded_model_state(model_dcp, old_keys) == {"blocks.0.ffn.router.gate.weight": 2,
                                                                   "embed.weight": 3}
    new_keys = old_keys | {"model.blocks.0.ffn.router.threshold"}
    assert migrations.sharded_model_state(model_dcp, new_keys) == model_dcp
    # any other missing entry stays, so DCP's strict load names it
    assert "embed.weight" in migrations.sharded_model_state(model_dcp, {"model.blocks.0.ffn.router.threshold"})


def test_an_old_exported_folders_threshold_gets_the_configured_value():
    buffer = torch.tensor(float("nan"))  # what from_pretrained leaves in a buffer the folder lacks
    migrations.exported_threshold(buffer, loaded=False, threshold=1.8)
    assert float(buffer) == pytest.approx(1.8)
    loaded = torch.tensor(1.25)  # a folder that has it (a controller moved it) keeps it
    migrations.exported_threshold(loaded, loaded=True, threshold=1.8)
    assert float(loaded) == 1.25
