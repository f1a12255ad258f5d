"""Checkpoints: atomic layout, manifest hashes, corrupt/partial detection with fallback, pruning.

Run: .venv/bin/python -m pytest -q tests/unit/train/test_checkpoint.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.train.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def save(root, step, keep_last=5, extra=None):
    model_state = {"w": torch.full((3, 2), float(step)), "b": torch.arange(4.0)}
    train_state = {"step": step, "rng": torch.get_rng_state(), "nested": {"m": torch.ones(2)}}
    return save_checkpoint(root, step, model_state, train_state, {"step": step}, extra_files=extra,
                           keep_last=keep_last)


def test_round_trip_and_layout(tmp_path):
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    path = save(tmp_path / "ckpt", 7, extra={"tokenizer.json": extra})
    assert path.name == "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "meta.json", "model.safetensors", "tokenizer.json", "train_state.pt"]
    model_state, train_state, meta = load_checkpoint(path)
    assert torch.equal(model_state["w"], torch.full((3, 2), 7.0))
    assert train_state["step"] == 7 and torch.equal(train_state["nested"]["m"], torch.ones(2))
    assert meta == {"step": 7}
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_corrupt_file_is_detected_and_previous_used(tmp_path):
    root = tmp_path / "ckpt"
    save(root, 1)
    bad = save(root, 2)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch for model.safetensors"):
        verify_checkpoint(bad)
    reports = []
    good = latest_good_checkpoint(root, reports.append)
    assert good.name == "step_0000001"
    assert len(reports) == 1 and "step_0000002" in reports[0] and "falling back" in reports[0]
    assert resolve_checkpoint(tmp_path / "ckpt", reports.append) == good


@pytest.mark.parametrize("damage", ["no_manifest", "missing_file", "extra_file", "bad_json"])
def test_partial_checkpoints_are_rejected(tmp_path, damage):
    path = save(tmp_path, 3)
    if damage == "no_manifest":
        (path / "manifest.json").unlink()
    elif damage == "missing_file":
        (path / "train_state.pt").unlink()
    elif damage == "extra_file":
        (path / "junk").write_text("x")
    else:
        (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    assert latest_good_checkpoint(tmp_path, lambda m: None) is None


def test_keep_last_prunes_oldest_and_ignores_temp_dirs(tmp_path):
    (tmp_path / ".tmp-step_0000009-1").mkdir()  # a crashed write: never listed, never loaded
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
    with pytest.raises(ValueError, match="keep_last=0"):
        save(tmp_path, 6, keep_last=0)


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints below"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("failure", ["too little free space", "ENOSPC while writing the weights",
                                     "torch.save's 'unexpected pos'"])
def test_a_full_disk_is_one_error_naming_the_path_and_the_bytes(tmp_path, monkeypatch, failure):
    """Issue 27, item 10: no traceback from torch / safetensors; the earlier checkpoint stays, no temp dir is left."""
    import errno
    import shutil
    from collections import namedtuple

    from softmoe.train import checkpoint as module

    root = tmp_path / "ckpt"
    save(root, 1)
    if failure == "too little free space":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    elif failure == "ENOSPC while writing the weights":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(module, "save_file", full)
    else:
        def unexpected_pos(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 490")
        monkeypatch.setattr(module.torch, "save", unexpected_pos)
    with pytest.raises(CheckpointError) as caught:
        save(root, 2)
    message = str(caught.value)
    assert str(root / "step_0000002") in message and "bytes needed" in message and "\n" not in message, message
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(root)] == ["step_0000001"] and verify_checkpoint(root / "step_0000001")
    assert not list(root.glob(".tmp-*"))
    shutil.rmtree(root)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    from softmoe.train import checkpoint as module

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(module, "save_file", broken)
    with pytest.raises(RuntimeError, match="something else"):
        save(tmp_path / "ckpt", 1)
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))
