"""softmoe.parallel.compat picks torch.distributed's new names (torch 2.13) or the old ones (torch 2.11, the GPU
machines' image), with the same result.

Run: .venv/bin/python -m pytest -q tests/unit/parallel/test_compat.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from softmoe.parallel import compat


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*is deprecated:FutureWarning")
@pytest.mark.parametrize("new_name", [True, False], ids=["all_gather_single", "all_gather_into_tensor"])
def test_all_gather_flat_with_either_name(one_rank_group, monkeypatch, new_name):
    if not new_name:
        monkeypatch.delattr(dist, "all_gather_single", raising=False)  # what torch 2.11 has
    elif not hasattr(dist, "all_gather_single"):
        pytest.skip("this torch has only all_gather_into_tensor")
    out = torch.zeros(3, dtype=torch.long)
    compat.all_gather_flat(out, torch.tensor([4, 0, 7]))
    assert out.tolist() == [4, 0, 7]


def test_ddp_keywords_follow_the_signature(monkeypatch):
    class NewDDP:
        def __init__(self, module, forward_sync_buffers=None, broadcast_buffers=None):
            pass

    class OldDDP:
        def __init__(self, module, broadcast_buffers=True):
            pass

    monkeypatch.setattr(compat, "DistributedDataParallel", NewDDP)
    assert compat.ddp_without_buffer_sync() == {"forward_sync_buffers": False}
    monkeypatch.setattr(compat, "DistributedDataParallel", OldDDP)
    assert compat.ddp_without_buffer_sync() == {"broadcast_buffers": False}
