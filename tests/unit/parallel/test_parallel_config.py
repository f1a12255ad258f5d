"""The `parallel` config section, batch sharding, and the single-process path of the global-count hook.

Run: .venv/bin/python -m pytest -q tests/unit/parallel/test_parallel_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmoe.layers.moe import MoELayer
from softmoe.parallel.data import shard_rows
from softmoe.parallel.launch import build_trainer
from softmoe.routing import losses
from softmoe.train.config import ParallelConfig, load_run_config

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny" / "softmoe.yaml"


def test_parallel_section_defaults_to_one_process():
    config = load_run_config(TINY)
    assert config.parallel == ParallelConfig(data="none", expert=1, backend="auto")
    assert not config.parallel.distributed
    assert load_run_config(TINY, ["parallel.data=fsdp", "parallel.expert=2"]).parallel.expert == 2


@pytest.mark.parametrize("overrides, match", [
    (["parallel.data=zero3"], r"parallel.data='zero3' must be one of \('none', 'ddp', 'fsdp'\)"),
    (["parallel.data=ddp", "parallel.expert=0"], r"parallel.expert=0 must be an int >= 1"),
    (["parallel.data=ddp", "parallel.expert=true"], r"parallel.expert=True must be an int >= 1"),
    (["parallel.backend=mpi"], r"parallel.backend='mpi' must be one of"),
    (["parallel.expert=2"], r"parallel.expert=2 needs parallel.data=ddp or fsdp"),
    (["parallel.dp=2"], r"unknown config key parallel.dp"),
])
def test_bad_parallel_settings_name_the_field(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_run_config(TINY, overrides)


def test_shards_are_disjoint_and_cover_the_batch():
    rows = [shard_rows(8, rank, 4) for rank in range(4)]
    assert [list(range(8))[r] for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="data.batch_size=6 must be divisible by the 4 data-parallel ranks"):
        shard_rows(6, 0, 4)


def test_distributed_config_outside_torchrun_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="parallel.data='ddp' needs a torchrun launch"):
        build_trainer(load_run_config(TINY, ["parallel.data=ddp"]))


def test_several_torchrun_processes_need_a_data_parallel_mode(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="torchrun started 2 processes but parallel.data=none"):
        build_trainer(load_run_config(TINY))


def test_global_sum_is_the_identity_outside_the_context():
    counts = torch.tensor([3, 0, 5])
    assert losses.global_sum(counts) is counts
    with losses.global_counts(lambda t: t * 2):
        assert torch.equal(losses.global_sum(counts), torch.tensor([6, 0, 10]))
    assert losses.global_sum(counts) is counts


def test_global_counts_reach_the_balance_loss_and_load():
    """Doubling every count leaves loads (shares) unchanged; a sum with another rank's counts moves them."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, router="topk", k=1.0)
    x = torch.randn(10, 8)
    local = dict(layer(x).stats)
    with losses.global_counts(lambda t: t * 2):
        doubled = layer(x).stats
    assert doubled["load_balance_loss"] == pytest.approx(float(local["load_balance_loss"]), rel=1e-6)
    # another rank's 10 tokens all went to expert 0: its counts per expert, then its real tokens (one collective)
    other = torch.tensor([10.0, 0, 0, 0, 10])
    with losses.global_counts(lambda t: t + other if t.shape == other.shape else t):
        summed = layer(x).stats
    assert summed["expert_load"][0] > local["expert_load"][0]
    assert float(summed["real_tokens"]) == 20 and float(local["real_tokens"]) == 10
