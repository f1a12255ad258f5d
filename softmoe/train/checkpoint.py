"""Atomic, verified checkpoints: safetensors weights, training state, a manifest of sha256 hashes.

Layout of one checkpoint, `<run>/checkpoints/step_0000100/`:
    model.safetensors   model parameters and persistent buffers
    train_state.pt      optimizer state, step, RNG state, data position (torch.save; loaded weights_only)
    meta.json           step and the run config (enough to rebuild the model without the YAML)
    <extra files>       e.g. tokenizer.json, so a checkpoint is self-contained
    manifest.json       sha256 and size of every file above; written last

Writing: everything goes into a hidden temporary directory next to the target, each file is fsynced,
the manifest is written last, then the directory is renamed into place and the parent fsynced. A
crash therefore leaves either a complete checkpoint or a `.tmp-*` directory that is never read.
Reading: a checkpoint is used only if its manifest lists exactly its files and every hash matches.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from softmoe.data.io import sha256_file

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "finish_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "good_checkpoints",
    "latest_good_checkpoint",
    "read_meta",
    "resolve_checkpoint",
]

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt."""



def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict,
                    meta: dict, extra_files: dict[str, Path] | None = None, keep_last: int = 3) -> Path:
    """Write checkpoint `root/step_<step>` atomically, then delete all but the newest `keep_last`.

    Args:
        root: the run's checkpoints directory (created if missing).
        step: optimizer steps completed; names the directory.
        model_state: model.state_dict() (tensors; tied weights must already be deduplicated).
        train_state: optimizer state, RNG state, data position... (anything torch.load(weights_only) reads).
        meta: JSON-serialisable metadata (step, run config).
        extra_files: name -> existing file to copy in (e.g. the tokenizer).
        keep_last: complete checkpoints to keep, >= 1.
    Returns:
        The final checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    need = _bytes_needed(model_state, train_state, extra_files)
    free = shutil.disk_usage(root).free
    if free < need:  # refuse before writing anything: the older checkpoints stay as they are
        raise CheckpointError(_no_space(root / f"step_{step:07d}", need, free))
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        return finish_checkpoint(tmp, root, step, train_state, meta, extra_files, keep_last)
    except Exception as err:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_disk_full(err):
            raise
        raise CheckpointError(_no_space(root / f"step_{step:07d}", need, shutil.disk_usage(root).free)) from None


# How a full disk (or quota) shows in the errors of open/write (errno), torch.save ("unexpected pos", "file write
# failed") and safetensors (Rust's "StorageFull", "os error 28").
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left", "StorageFull", "os error 28", "unexpected pos", "file write failed",
                   "Disk quota exceeded")


def _is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` (or an error it was raised from) says the disk or the quota is full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _bytes_needed(model_state: dict, train_state: dict, extra_files: dict[str, Path] | None) -> int:
    """A checkpoint's size, estimated: its tensors' bytes, the extra files, and 1 MiB for metadata and headers."""
    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    files = sum(Path(src).stat().st_size for src in (extra_files or {}).values())
    return tensor_bytes(model_state) + tensor_bytes(train_state) + files + (1 << 20)


def _no_space(final: Path, need: int, free: int) -> str:
    return (f"cannot write checkpoint {final}: not enough disk space (about {need:,} bytes needed, {free:,} free); "
            f"the earlier checkpoints are intact: free some space and continue with --resume")


def finish_checkpoint(tmp: Path, root: Path, step: int, train_state: dict, meta: dict,
                      extra_files: dict[str, Path] | None, keep_last: int) -> Path:
    """Complete a checkpoint whose weights are already in `tmp`: add train state, meta and extra files,
    fsync everything, write the manifest last, rename `tmp` to `root/step_<step>`, prune old ones.

    Shared by `save_checkpoint` and the sharded (multi-process) checkpoints of softmoe/parallel.
    """
    final = root / f"step_{step:07d}"
    torch.save(train_state, tmp / "train_state.pt")
    _write_json(tmp / "meta.json", meta)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync_file(tmp / name)
    manifest = {"step": step, "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
                                        for n in files}}
    _write_json(tmp / MANIFEST, manifest)
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    if final.is_dir() and not final.is_symlink():  # a re-save of the same step (e.g. after a resume)
        shutil.rmtree(final)
    elif final.exists() or final.is_symlink():  # a stray file or link where the checkpoint goes
        final.unlink()
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root` (complete or not), oldest first; temp dirs excluded."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest against the files; return the manifest or raise CheckpointError saying why."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (partial or interrupted write)")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                   for e in listed.values()):
            raise TypeError("every file entry needs a sha256 string")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({type(err).__name__}: {err})") from None
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    if set(listed) != present:
        raise CheckpointError(f"{path}: files {sorted(present)} differ from the manifest's {sorted(listed)}")
    for name, entry in listed.items():
        actual = sha256_file(path / name)
        if actual != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 mismatch for {name} (manifest {entry['sha256'][:12]}..., "
                                  f"file {actual[:12]}...): the file is corrupt")
    return manifest


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Verify, then load (model_state, train_state, meta) from one checkpoint directory."""
    path = Path(path)
    verify_checkpoint(path)
    if not (path / "model.safetensors").is_file() and (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: a sharded checkpoint of a multi-process run; resume it under torchrun, "
                              f"or convert it: python -m softmoe.parallel.checkpoint {path} OUT_DIR")
    name = "model.safetensors"
    try:
        model_state = load_file(str(path / name))
        name = "train_state.pt"
        train_state = torch.load(path / name, weights_only=True)
    except Exception as err:  # any failure to parse a verified file: the writer wrote garbage
        raise CheckpointError(f"{path / name}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    return model_state, train_state, read_meta(path)


def good_checkpoints(root: Path, report: Callable[[str], None] = print) -> Iterator[Path]:
    """The checkpoints under `root` that verify, newest first; each rejected one is reported with its reason."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            report(f"checkpoint rejected: {err}; falling back to the previous one")
            continue
        yield path


def read_meta(path: Path) -> dict:
    """meta.json of a verified checkpoint (step, run config); CheckpointError if it does not parse."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{Path(path) / 'meta.json'}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(path) / 'meta.json'}: not a JSON object")
    return meta


def latest_good_checkpoint(root: Path, report: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under `root` that verifies; each rejected one is reported with its reason."""
    return next(good_checkpoints(root, report), None)


def resolve_checkpoint(path: Path, report: Callable[[str], None] = print) -> Path:
    """Accept a checkpoint directory, a run's `checkpoints/` directory or a run directory.

    Returns the checkpoint itself, or the newest good one below the given directory.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = latest_good_checkpoint(root, report)
            if found is None:
                raise CheckpointError(f"{root}: no checkpoint passes verification")
            return found
    raise CheckpointError(f"{path}: not a checkpoint, and no checkpoints below it")
