"""Run-directory ownership: one config per run directory, one trainer at a time, resume from the run itself.

A run directory `<out_dir>/<name>/` belongs to the config recorded in its `config.yaml`:

- a new run (`mode="new"`) refuses a directory that holds a run with another config (one that trains
  something else: logging and cadence settings may differ), or one with checkpoints (it would silently
  retrain over them); `mode="overwrite"` empties it first;
- `mode="resume"` needs a checkpoint that verifies, and a config whose *trajectory* settings (everything
  but logging, evaluation cadence, checkpoint cadence, threads and paths) equal the run's;
- `mode="auto"` (the main job and the comparison study) resumes when there is a checkpoint and starts
  otherwise, under the same rules;
- `RunLock` holds `<run_dir>/.lock` (an flock, with the holder's PID and host written in it): a second
  trainer is refused naming the holder; the kernel drops the lock when its process dies, so a crashed
  run's lock is recovered by the next trainer, which also deletes the crash's stale temp files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import yaml

from softmoe.common.checks import check_choice
from softmoe.train.checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints, read_meta
from softmoe.train.config import RunConfig, apply_overrides, run_config_from_dict

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunDirError", "RunLock", "MODES", "NON_TRAJECTORY", "resolved_dict", "config_diff", "trajectory_diff",
           "read_saved_config", "check_ownership", "resume_config", "clean_stale_temp", "empty_run_dir"]

MODES = ("new", "resume", "auto", "overwrite")
LOCK = ".lock"

# Settings that do not change what is trained: a resume may change them.
NON_TRAJECTORY = {
    "train": {"name", "out_dir", "progress", "tensorboard", "log_every", "eval_every", "eval_batches",
              "ckpt_every", "keep_last", "threads", "max_bad_steps", "activation_checkpointing", "device",
              "compile"},
    "data": {"data_dir"},
    "model": set(),
    # how many processes train it: a run may continue on another layout (float round-off, not bitwise)
    "parallel": {"data", "expert", "backend"},
}


class RunDirError(ValueError):
    """A run directory cannot be used as asked (another config, nothing to resume, locked, ...)."""


def resolved_dict(config: RunConfig | dict) -> dict:
    """`config` as a plain dict with every default resolved (`to_dict` writes the typed `model.router_options`
    and `model.budget_options` with all their fields, not only those set), so a saved config.yaml states what
    was used."""
    if isinstance(config, dict):
        config = run_config_from_dict(config)
    raw = config.to_dict()
    raw["train"]["schedule_steps"] = config.train.schedule_end  # kept by `--resume train.steps=N`
    return raw


def config_diff(saved: RunConfig | dict, now: RunConfig | dict) -> list[str]:
    """Dotted keys (`model.router`, `train.steps`, `model.router_options.alpha`) whose resolved values differ."""
    a, b = resolved_dict(saved), resolved_dict(now)
    diff = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            va, vb = sa.get(key), sb.get(key)
            if isinstance(va, dict) and isinstance(vb, dict):
                diff += [f"{section}.{key}.{sub}" for sub in sorted(set(va) | set(vb)) if va.get(sub) != vb.get(sub)]
            elif va != vb:
                diff.append(f"{section}.{key}")
    return diff


def trajectory_diff(saved: RunConfig | dict, now: RunConfig | dict) -> list[str]:
    """The keys of `config_diff` that change what is trained (see NON_TRAJECTORY).

    More `train.steps` on the same schedule (train.schedule_steps, resolved) is no change: the steps done so far
    are the same, the run only goes on for longer (`--resume train.steps=N`)."""
    keys = [key for key in config_diff(saved, now)
            if key.split(".")[1] not in NON_TRAJECTORY.get(key.split(".")[0], set())]
    if "train.steps" in keys:
        a, b = resolved_dict(saved)["train"], resolved_dict(now)["train"]
        if "train.schedule_steps" not in keys and b["steps"] > a["steps"]:
            keys.remove("train.steps")
        elif a["schedule_steps"] == a["steps"] and b["schedule_steps"] == b["steps"]:
            keys.remove("train.schedule_steps")  # both span their own train.steps: name only that
    return keys


def read_saved_config(run_dir: Path) -> dict | None:
    """The run's recorded config.yaml as a dict (None when there is none); RunDirError if unreadable."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
        run_config_from_dict(raw)
    except (OSError, yaml.YAMLError, ValueError, TypeError) as err:
        reason = str(err).splitlines()[0]
        raise RunDirError(f"{path}: unreadable run config ({reason}); fix it or pass --overwrite") from None
    return raw


def _describe(keys: list[str], saved: dict, config: RunConfig) -> str:
    a, b = resolved_dict(saved), resolved_dict(config)

    def value(raw: dict, key: str):
        for part in key.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        return raw

    return ", ".join(f"{key} {value(a, key)!r} -> {value(b, key)!r}" for key in keys)


def check_ownership(config: RunConfig, mode: str, has_good_checkpoint: bool) -> None:
    """Refuse to use `config`'s run directory in `mode` when that would corrupt or silently redo a run.

    Args:
        config: the run's config (for resume: already the run's own config plus allowed overrides).
        mode: "new" | "resume" | "auto" (see the module docstring); "overwrite" checks nothing.
        has_good_checkpoint: whether the run directory holds a checkpoint that verifies.
    Raises:
        RunDirError naming the run directory and, for a config mismatch, the differing keys.
    """
    check_choice("mode", mode, MODES)
    if mode == "overwrite":
        return
    run_dir = config.train.run_dir
    saved = read_saved_config(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if mode == "resume" and not checkpoints:
        raise RunDirError(f"--resume: {run_dir} has no checkpoint to resume (check train.name and train.out_dir)")
    if mode in ("resume", "auto") and checkpoints and not has_good_checkpoint:
        raise RunDirError(f"{run_dir}: no checkpoint passes verification (all {len(checkpoints)} are corrupt); "
                          f"nothing was changed; pass --overwrite to start the run again")
    if saved is not None:
        keys = trajectory_diff(saved, config)
        if keys:
            raise RunDirError(f"{run_dir} holds a run with another config ({_describe(keys, saved, config)}); "
                              f"choose another train.name, or pass --overwrite to replace it")
    if mode == "new" and checkpoints:
        raise RunDirError(f"{run_dir} already holds this run (checkpoint {checkpoints[-1].name}); "
                          f"pass --resume to continue it or --overwrite to start again")


def resume_config(requested: RunConfig, overrides: list[str]) -> RunConfig:
    """The config a `--resume` continues with: the run's own config.yaml plus the command line's overrides.

    The preset only locates the run directory (train.out_dir / train.name); overrides may change only
    settings that do not alter the trajectory (logging, evaluation and checkpoint cadence, threads, paths), and
    train.steps may grow (an extension).
    """
    run_dir = requested.train.run_dir
    saved = read_saved_config(run_dir)
    if saved is None:  # a run directory from before config.yaml was kept: its newest checkpoint's config
        newest = latest_good_checkpoint(run_dir / "checkpoints", lambda message: None)
        try:
            saved = read_meta(newest).get("config") if newest is not None else None
        except CheckpointError as err:
            raise RunDirError(f"--resume: {err}") from None
    if not isinstance(saved, dict):
        raise RunDirError(f"--resume: {run_dir} holds no run (no config.yaml; check train.name and train.out_dir)")
    try:
        # resolved: a run saved before train.schedule_steps existed spans its own train.steps, which an extension
        # (`train.steps=N`) keeps
        saved = resolved_dict(saved)
        config = run_config_from_dict(apply_overrides(saved, overrides))
    except (ValueError, TypeError) as err:
        raise RunDirError(f"--resume: {err}") from None
    changed = trajectory_diff(saved, config)
    if changed:
        raise RunDirError(f"--resume: the override(s) would change the run's trajectory: "
                          f"{_describe(changed, saved, config)}; "
                          f"only {sorted(NON_TRAJECTORY['train'] - {'name', 'out_dir'})} and data.data_dir may change "
                          f"on resume, and train.steps may grow (start a new run with another train.name instead)")
    train = dataclasses.replace(config.train, out_dir=requested.train.out_dir, name=requested.train.name)
    return dataclasses.replace(config, train=train)


def clean_stale_temp(run_dir: Path, report: Callable[[str], None]) -> None:
    """Delete temp files and directories left by killed writers (call only while holding the lock)."""
    stale = [p for p in (Path(run_dir) / "checkpoints").glob(".tmp-*")]
    stale += [p for p in Path(run_dir).glob(".*.tmp-*")] + [p for p in Path(run_dir).glob("*.tmp")]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        report(f"{run_dir}: removed {len(stale)} temp file(s) left by an interrupted write")


def empty_run_dir(run_dir: Path) -> None:
    """Delete everything a run wrote in `run_dir` (for --overwrite), keeping the lock file."""
    for path in Path(run_dir).iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunLock:
    """Exclusive lock on a run directory for the lifetime of one trainer (a context manager).

    `<run_dir>/.lock` is flock'ed and holds {"pid", "host"} of the holder. A second trainer gets
    RunDirError naming the holder. A crash releases the flock with the process, so the next trainer
    takes the lock over (reporting the dead holder) without anyone deleting files by hand.
    """

    def __init__(self, run_dir: Path, report: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK
        self.report = report
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        f.seek(0)
        previous = f.read()
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RunDirError(f"{self.path.parent} is in use by another trainer ({_holder(previous)}); "
                                  f"wait for it to finish or stop it") from None
        if previous.strip():  # the previous holder died without releasing (a clean exit empties the file)
            self.report(f"{self.path.parent}: recovered the lock of a crashed trainer ({_holder(previous)})")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        f.seek(0)
        f.truncate()  # empty = released cleanly
        f.flush()
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
