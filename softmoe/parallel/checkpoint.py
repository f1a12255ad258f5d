"""Sharded checkpoints of a multi-process run (torch.distributed.checkpoint), and their conversion to
the single-file checkpoint that `softmoe eval`, `generate` and `export` read.

Layout of `checkpoints/step_<step>/` (a sharded checkpoint):
    .metadata, __<rank>_0.distcp   DCP: model and AdamW state; each rank writes its own shards
                                   (FSDP2 DTensor shards, its expert-parallel experts), replicated
                                   tensors once
    train_state.pt, meta.json      step, RNG, data position; the run config (as a single-file checkpoint)
    tokenizer files, manifest.json sha256 of every file, written last by rank 0

Atomic like the single-file checkpoint: every rank writes into the same hidden `.tmp-step_*` directory
(a filesystem all ranks share), rank 0 adds the rest, the manifest last, and renames it into place
(`softmoe.train.checkpoint.finish_checkpoint`); an interrupted save leaves a temp directory never read.
Expert-parallel weights are saved one tensor per expert (`<name>.expert<e>`), so a checkpoint does
not depend on how the experts were split over ranks.

Both directions: `to_single_file` turns a sharded checkpoint into the single-file format, and `restore`
also accepts a single-file checkpoint, so a run started in one process continues on many (`--resume`).

Convert: python -m softmoe.parallel.checkpoint SHARDED_CHECKPOINT OUT_DIR
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from softmoe.common import migrations
from softmoe.model import GPT
from softmoe.parallel.expert import ExpertParallelBank
from softmoe.train.checkpoint import (
    CheckpointError,
    finish_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from softmoe.train.config import run_config_from_dict
from softmoe.train.rundir import resolved_dict

__all__ = ["save", "restore", "is_sharded", "to_single_file", "main"]

DCP_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint directory holds a DCP (sharded) checkpoint."""
    return (Path(path) / DCP_METADATA).is_file()


def _expert_slices(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (first expert, count) for every expert-parallel parameter of `model`."""
    return {f"{name}.{p}": (m.first, m.w_gate.shape[0]) for name, m in model.named_modules()
            if isinstance(m, ExpertParallelBank) for p, _ in m.named_parameters(recurse=False)}


def _saved_keys(path: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _per_expert(state: dict, slices: dict[str, tuple[int, int]]) -> dict:
    """Replace each expert-parallel entry (El, ...) by El entries `<name>.expert<e>` (views, so a DCP
    load into them writes the parameter)."""
    out = {}
    for name, value in state.items():
        if name in slices:
            first, count = slices[name]
            out.update({f"{name}.expert{first + i}": value[i] for i in range(count)})
        else:
            out[name] = value
    return out


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, the DCP state of both with per-expert entries)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    slices = _expert_slices(model)
    per_param = {name: _per_expert(entry, {k: slices[name] for k in entry if k != "step"})
                 if name in slices else entry for name, entry in optim_state["state"].items()}
    optim_flat = {f"{name}.{key}": value for name, entry in per_param.items() for key, value in entry.items()}
    return model_state, optim_state, {"model": _per_expert(model_state, slices), "optim": optim_flat}


def save(trainer, root: Path) -> Path:
    """Write the sharded checkpoint of `trainer` (a DistributedTrainer) after `trainer.step` steps (collective)."""
    root = Path(root)
    tmp = root / f".tmp-step_{trainer.step:07d}-sharded"
    if trainer.world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _, _, state = _dcp_state(trainer.model, trainer.optimizer)
    dcp.save(state, checkpoint_id=tmp)
    final = root / f"step_{trainer.step:07d}"
    if trainer.world.is_main:
        meta = {"step": trainer.step, "config": resolved_dict(trainer.config), "sharded": True,
                "world_size": trainer.world.size}
        finish_checkpoint(tmp, root, trainer.step, trainer._train_state(), meta, trainer.data.checkpoint_files(),
                          trainer.config.train.keep_last)
    dist.barrier()
    return final


def restore(trainer, path: Path) -> Path:
    """Load checkpoint `path` (sharded, or single-file) into `trainer` (collective on every rank)."""
    path = Path(path)
    if not is_sharded(path):
        return _restore_single_file(trainer, path)
    meta = read_meta(path)
    try:
        train_state = torch.load(path / "train_state.pt", weights_only=True)
    except Exception as err:  # a verified file that does not parse: the writer wrote garbage
        raise CheckpointError(f"{path / 'train_state.pt'}: unreadable ({type(err).__name__})") from None
    trainer._check_resumable(meta, train_state, path, required=("step", "rng_torch", "data_position",
                                                                 "skipped_total"))
    if meta.get("world_size") != trainer.world.size:
        trainer.report(f"warning: {path} was written by {meta.get('world_size')} processes, resuming with "
                       f"{trainer.world.size}: not an exact continuation")
    model_state, optim_state, state = _dcp_state(trainer.model, trainer.optimizer)
    state["model"] = migrations.sharded_model_state(state["model"], _saved_keys(path))
    dcp.load(state, checkpoint_id=path)  # in place: the per-expert views write through
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    trainer._resume_position(train_state, path)
    return path


def _restore_single_file(trainer, path: Path) -> Path:
    """Continue a single-process run on many processes: its full model and AdamW state, sharded here.

    The optimizer state of a single-file checkpoint is keyed by parameter index; both trainers build
    their optimizer with the same `build_optimizer` over the same parameter names, so index i is the
    same parameter, which DCP's `set_state_dict` then takes by name (and FSDP2 shards, expert parallel
    slices).
    """
    model_state, train_state, meta = load_checkpoint(path)
    trainer._check_resumable(meta, train_state, path)
    saved = train_state["optimizer"]
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    order = [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]
    optim_state = {"state": {order[i]: dict(entry) for i, entry in saved["state"].items()},
                   "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
    for name, (first, count) in _expert_slices(trainer.model).items():  # this rank's experts of the full bank
        model_state[name] = model_state[name][first:first + count]
        entry = optim_state["state"].get(name, {})
        for key in [k for k in entry if k != "step"]:
            entry[key] = entry[key][first:first + count]
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
    trainer._resume_position(train_state, path)
    return path


def to_single_file(sharded: Path, out_root: Path) -> Path:
    """Convert a sharded checkpoint to a single-file one under `out_root` (weights only; one process).

    Returns:
        the new checkpoint directory `out_root/step_<step>`, readable by `softmoe eval/generate/export`.
    """
    sharded = resolve_checkpoint(Path(sharded))
    if not is_sharded(sharded):
        raise CheckpointError(f"{sharded}: not a sharded checkpoint (no {DCP_METADATA})")
    meta = read_meta(sharded)
    model = GPT(run_config_from_dict(meta["config"]).model)
    model_state = model.state_dict()
    saved = _saved_keys(sharded)
    # Expert-parallel runs saved one entry per expert (`<name>.expert<e>`); the others whole tensors.
    experts = {name: (0, t.shape[0]) for name, t in model_state.items() if f"model.{name}.expert0" in saved}
    with warnings.catch_warnings():  # one process reading on purpose: DCP's "assuming a single process" is noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": migrations.sharded_model_state(_per_expert(model_state, experts), saved)}, checkpoint_id=sharded,
                 no_dist=True)
    train_state = torch.load(sharded / "train_state.pt", weights_only=True)
    train_state = {key: train_state[key] for key in ("step", "rng_torch", "data_position", "skipped_total")}
    meta = {"step": meta["step"], "config": meta["config"], "converted_from": str(sharded)}
    extra = {p.name: p for p in sharded.iterdir() if p.name.startswith("tokenizer")}
    return save_checkpoint(Path(out_root), meta["step"], model_state, train_state, meta, extra_files=extra,
                           keep_last=1_000_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softmoe.parallel.checkpoint",
                                     description="convert a sharded (multi-process) checkpoint to a single-file one")
    parser.add_argument("sharded", help="a sharded checkpoint directory, or a run directory (newest good one)")
    parser.add_argument("out", help="directory to write step_<step>/ into")
    args = parser.parse_args(argv)
    try:
        path = to_single_file(Path(args.sharded), Path(args.out))
    except (CheckpointError, ValueError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    verify_checkpoint(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
