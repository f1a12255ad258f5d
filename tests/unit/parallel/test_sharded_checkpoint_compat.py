"""A sharded (DCP) checkpoint written before a model gained state (SoftKRouter.threshold) still loads: DCP's
load is strict, so the entries the checkpoint lacks are left out and keep the value the model was built with.

Run: .venv/bin/python -m pytest -q tests/unit/parallel/test_sharded_checkpoint_compat.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from softmoe.model import GPT
from softmoe.model.config import ModelConfig
from softmoe.common.migrations import sharded_model_state as _without_added_state
from softmoe.parallel.checkpoint import _saved_keys


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, num_experts=8, d_expert=16,
                           router="softmoe", k=2.0))


def test_an_old_sharded_checkpoint_loads_with_the_configured_threshold(tmp_path):
    old = {name: t.clone() for name, t in _model(0).state_dict().items() if not name.endswith("router.threshold")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": old}, checkpoint_id=tmp_path, no_dist=True)
        model = _model(1)
        for name, t in model.state_dict().items():
            if name.endswith("router.threshold"):
                t.fill_(0.5)  # whatever the model holds is what it keeps
        state = model.state_dict()
        with pytest.raises(CheckpointException) as refused:  # what DCP does without the filter
            dcp.load({"model": dict(state)}, checkpoint_id=tmp_path, no_dist=True)
        causes = repr(refused.value.failures)
        assert "Missing key in checkpoint state_dict: model.blocks.0.ffn.router.threshold" in causes
        loadable = _without_added_state(state, _saved_keys(tmp_path))
        dcp.load({"model": loadable}, checkpoint_id=tmp_path, no_dist=True)
    assert sorted(set(state) - set(loadable)) == ["blocks.0.ffn.router.threshold", "blocks.1.ffn.router.threshold"]
    loaded = model.state_dict()
    for name, value in old.items():
        assert torch.equal(loaded[name], value), name
    assert all(float(loaded[n]) == 0.5 for n in state if n.endswith("router.threshold"))


def test_only_the_known_added_state_may_be_missing():
    state = {"blocks.0.ffn.router.threshold": 1, "blocks.0.ffn.router.gate.weight": 2}
    assert _without_added_state(state, set()) == {"blocks.0.ffn.router.gate.weight": 2}  # DCP will name it
    assert _without_added_state(state, {"model.blocks.0.ffn.router.threshold"}) == state
