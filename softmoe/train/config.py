"""TrainConfig, the RunConfig that composes model + data + train, and the YAML / override loader.

A preset is a YAML file with three sections, each mapping onto one frozen dataclass:

    model: {d_model: 256, router: softmoe, ...}     -> ModelConfig
    data:  {...}                                    -> DataConfig
    train: {steps: 1000, lr: 3.0e-3, ...}           -> TrainConfig
    parallel: {data: ddp, expert: 2}                -> ParallelConfig (optional; default: one process)

Unknown sections or keys are errors (with a suggestion). Overrides are `section.field=value` strings,
the value parsed as YAML (`train.lr=3e-4`, `model.router_options.alpha=0.3`).
"""

from __future__ import annotations

import dataclasses
import re
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softmoe.common import migrations
from softmoe.common.checks import check_bool, check_choice, check_float, check_int
from softmoe.common.precision import PRECISIONS, check_device_name
from softmoe.train.controllers import AE_LEVERS
from softmoe.data.config import DataConfig
from softmoe.model.config import ModelConfig
from softmoe.routing import ROUTERS, router_class
from softmoe.routing.budget import BudgetOptions
from softmoe.common.presets import find_config

__all__ = ["TrainConfig", "ParallelConfig", "RunConfig", "load_run_config", "run_config_from_dict", "apply_overrides",
           "same_config"]

DATA_PARALLEL = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    name: str = "run"  # run name: outputs go to <out_dir>/<name>/
    out_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # seeds model init and the data windows
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 50  # linear warmup steps
    schedule_steps: int = 0  # steps the warmup + cosine spans (0: train.steps); later steps keep the floor lr
    weight_decay: float = 0.1  # AdamW decay on matrices only (see train/optim.py)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    budget_lr_mult: float = 1.0  # lr multiplier for budget / alpha parameters
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # "fp32" | "bf16" (autocast on the run's device; routing stays fp32)
    device: str = "auto"  # "auto" (CUDA when available, else cpu) | "cpu" | "cuda" | "cuda:<index>"
    compile: bool = False  # torch.compile the model (the MoE layers' ragged dispatch is one dynamic size)
    ae_target: float = 0.0  # >= 1: hold the realized Train AE at this between steps (0 = off); see ae_lever
    ae_lever: str = ""  # with ae_target: what it moves, "threshold" (the routers' relative threshold) | "budget" (K)
    ae_rate: float = 0.05  # the ae_target controller's step: the lever moves by ae_rate * (ae_target - AE) per step
    ae_k_max: float = 0.0  # ae_lever=budget: the controller keeps K <= this (0: the budget's own k_max = E - margin)
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    log_every: int = 10  # steps between train-metric records
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 10  # validation batches per pass (a fixed set)
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated (skipped) before aborting
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # mirror metrics to TensorBoard
    activation_checkpointing: bool = False  # recompute each block in backward (less memory, one more forward)

    def __post_init__(self) -> None:
        check_int("train.seed", self.seed, 0, 2**63 - 1)  # what the RNGs take (a larger one overflowed in torch)
        for name, low in [("steps", 1), ("grad_accum", 1), ("warmup_steps", 0), ("schedule_steps", 0), ("threads", 0),
                          ("log_every", 1), ("eval_every", 0), ("eval_batches", 1), ("ckpt_every", 0),
                          ("keep_last", 1), ("max_bad_steps", 0)]:
            check_int(f"train.{name}", getattr(self, name), low)
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "budget_lr_mult",
                     "grad_clip", "ae_target", "ae_rate", "ae_k_max"):
            high = 1 if name in ("min_lr_ratio", "beta1", "beta2") else math.inf
            # lr > 0; eps > 0: AdamW divides by sqrt(v) + eps, and v is 0 for a parameter without gradient yet
            check_float(f"train.{name}", getattr(self, name), 0, high, open_low=name in ("lr", "eps"))
        for name in ("activation_checkpointing", "progress", "tensorboard"):
            check_bool(f"train.{name}", getattr(self, name))
        check_device_name(self.device, "train.device")
        check_bool("train.compile", self.compile)
        if self.ae_target > 0 and self.ae_rate == 0:
            raise ValueError(f"train.ae_rate=0 must be > 0 with train.ae_target={self.ae_target}")
        if 0 < self.ae_target < 1:
            raise ValueError(f"train.ae_target={self.ae_target} must be 0 (off) or >= 1 (every token keeps one expert)")
        # No default lever: configs written before the threshold lever existed moved K without naming it.
        if self.ae_target > 0 and self.ae_lever not in AE_LEVERS:
            raise ValueError(f"train.ae_lever={self.ae_lever!r} must be one of {AE_LEVERS} with train.ae_target="
                             f"{self.ae_target} (runs configured before 2026-12-02 moved K: train.ae_lever=budget)")
        check_choice("train.ae_lever", self.ae_lever, ("", *AE_LEVERS))
        if self.ae_k_max and self.ae_lever != "budget":
            raise ValueError(f"train.ae_k_max={self.ae_k_max} bounds the budget K: it needs train.ae_lever=budget "
                             f"(got {self.ae_lever!r})")
        check_choice("train.precision", self.precision, PRECISIONS)
        if not isinstance(self.name, str) or self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"train.name={self.name!r} must be a directory name (not '.' or '..', no '/')")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def schedule_end(self) -> int:
        """The step count the learning-rate schedule spans: schedule_steps, or steps when 0. A run extended with
        `--resume train.steps=N` keeps its old end, so the added steps train at lr * min_lr_ratio."""
        return self.schedule_steps or self.steps


@dataclass(frozen=True)
class ParallelConfig:
    """How a run spreads over processes (launched by torchrun; see softmoe/parallel and docs/training.md).

    The default is one process, the path every single-process run takes unchanged.
    """

    data: str = "none"  # "none" (one process) | "ddp" (DistributedDataParallel) | "fsdp" (FSDP2 fully_shard)
    expert: int = 1  # expert-parallel group size: each group of this many ranks shards the experts of a layer
    backend: str = "auto"  # torch.distributed backend: "auto" = nccl on CUDA, gloo on CPU

    def __post_init__(self) -> None:
        check_choice("parallel.data", self.data, DATA_PARALLEL)
        check_int("parallel.expert", self.expert, 1)
        check_choice("parallel.backend", self.backend, BACKENDS)
        if self.expert > 1 and self.data == "none":
            raise ValueError(f"parallel.expert={self.expert} needs parallel.data=ddp or fsdp (the ranks of an "
                             f"expert-parallel group read different data)")

    @property
    def distributed(self) -> bool:
        return self.data != "none"


@dataclass(frozen=True)
class RunConfig:
    """One training run: model, data and training settings, checked against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.train.activation_checkpointing and self.parallel.distributed:
            # The recomputation in backward runs outside the forward's global-count all-reduce (and would
            # repeat expert-parallel all-to-alls): single process only until that is handled.
            raise ValueError(f"train.activation_checkpointing=true needs parallel.data=none (got "
                             f"parallel.data={self.parallel.data!r}): multi-process runs do not support it yet")
        if self.train.compile and self.parallel.distributed:
            raise ValueError(f"train.compile=true is not supported with parallel.data={self.parallel.data!r} yet; "
                             f"compile a single-process run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig}


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """YAML 1.1 reads `3e-4` as a string and `1` as an int: `value` as the number a float field (`kind`) declares."""
    if kind in ("float", float, "float | None") and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}={value!r} must be a number") from None
    return value


def _coerced(cls, values: dict, where: str) -> dict:
    """`values` (a YAML mapping onto dataclass `cls`) with each number read as its field declares; names `cls`
    lacks are left for `cls` (or its builder) to refuse."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    return {key: _coerce(kinds[key], value, f"{where}.{key}") if key in kinds else value
            for key, value in values.items()}


def _model_options(values: dict) -> dict:
    """The model section with its `router_options` / `budget_options` numbers coerced against the typed options
    (the one place YAML numbers are read: routing/ only ever sees Python numbers)."""
    values = dict(values)
    router = values.get("router", ModelConfig.router)
    nested = {"budget_options": BudgetOptions}
    if isinstance(router, str) and router in ROUTERS:
        nested["router_options"] = router_class(router).options_class
    for name, cls in nested.items():
        if isinstance(values.get(name), dict):
            values[name] = _coerced(cls, values[name], f"model.{name}")
    return values


def _section(cls, values: Any, section: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise ValueError(f"unknown config key {section}.{key}" + (f" (did you mean {section}.{hint[0]}?)"
                                                                       if hint else f"; valid keys: {names}"))
    raw_values = values
    try:
        if cls is ModelConfig:
            values = _model_options(values)
        return cls(**_coerced(cls, values, section))
    except ValueError as err:
        raise ValueError(_qualified(str(err), section, raw_values)) from None


def _qualified(message: str, section: str, values: dict) -> str:
    """A config class's error ('k=9.0 must be ...') with the key as the user writes it ('model.k=9.0 must be ...',
    'model.router_options.alpha=-1.0 ...'); messages that already name their section are kept."""
    match = re.match(r"([A-Za-z_]\w*)=", message)
    if message.startswith(f"{section}.") or match is None:
        return message
    key = match.group(1)
    if key in values:
        return f"{section}.{message}"
    nested = [name for name, value in values.items() if isinstance(value, dict) and key in value]
    return f"{section}.{nested[0]}.{message}" if len(nested) == 1 else f"{section}: {message}"


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from {"model": {...}, "data": {...}, "train": {...}, "parallel": {...}}; missing keys
    (and the optional `parallel` section) take defaults."""
    if not isinstance(raw, dict):
        raise ValueError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid sections: {list(_SECTIONS)}")
    raw = migrations.run_config(raw)  # older saved configs -> today's layout
    return RunConfig(**{name: _section(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()})


def same_config(saved: dict, config: RunConfig, sections: tuple[str, ...] = ("model", "data", "train")) -> bool:
    """Whether a saved `config.to_dict()` equals `config` in `sections`, after filling the defaults of fields
    added since it was written (so a new option at its default does not orphan older runs)."""
    try:
        parsed = run_config_from_dict(saved).to_dict()
    except (ValueError, TypeError):
        return False
    now = config.to_dict()
    return all(parsed.get(section) == now[section] for section in sections)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `section.key[.subkey]=value` override applied."""
    if not isinstance(raw, dict):
        raise ValueError(f"a run config must be a mapping of sections, got {type(raw).__name__}")
    raw = {name: dict(raw[name]) if isinstance(raw.get(name), dict) else raw.get(name) or {}
           for name in set(raw) | set(_SECTIONS)}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        if parts[0] not in _SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {parts[0]!r}; valid sections: {list(_SECTIONS)}")
        target = raw[parts[0]]
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: config section {parts[0]!r} is not a mapping")
        for part in parts[1:-1]:  # nested dict fields such as model.router_options.alpha
            target[part] = dict(target.get(part) or {})
            target = target[part]
        try:
            target[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_first_line(err)})") from None
    return raw


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:160]


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset (or defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = find_config(path)  # a file, or a preset name such as tiny/softmoe
        if not path.exists():
            raise ValueError(f"config file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} is not a file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML ({_first_line(err)})") from None
    return run_config_from_dict(apply_overrides(raw, overrides or []))
