"""Retrofit a transformers MoE model with SoftMoE routing, in place, and save / reload it.

`from_hf(model, alpha=...)` replaces every Mixtral / Qwen2-MoE / OLMoE sparse MoE block with a
`SoftRoutedBlock` (softmoe/convert/blocks.py): same gate and experts (the very Parameter objects),
soft top-k routing with a learnable per-layer k_l under one global budget K, initialised at the model's
top-k. The added state (budget theta and buffers, per-layer log alpha) is one child module,
`model.softmoe_retrofit`, and the settings are written to `model.config.softmoe_retrofit`.

Saving is transformers' own `model.save_pretrained(out)`: model.safetensors holds the original weights
(in the layout transformers writes) plus the `softmoe_retrofit.*` tensors, and config.json holds the
settings. `from_pretrained(out)` loads the HF model, re-applies the conversion from the settings and
restores the `softmoe_retrofit.*` tensors, so the round trip is exact. Loaded with plain
`AutoModelForCausalLM.from_pretrained(out)` instead, the folder is the original architecture with the
(possibly fine-tuned) gate and expert weights and top-k routing; `from_hf` refuses such a model, because
its learned k_l and alpha were dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from softmoe.common.checks import check_bool, check_choice, check_float
from softmoe.convert.blocks import FAMILIES, RetrofitState, SoftRoutedBlock, check_layout, family_of
from softmoe.routing.budget import BUDGET_MODES
from softmoe.routing.softk import COMBINE_MODES, SoftKConfig

__all__ = ["RetrofitConfig", "check_model_type", "check_options", "from_hf", "from_pretrained", "STATE_PREFIX",
           "CONFIG_KEY", "soft_blocks"]

STATE_PREFIX = "softmoe_retrofit."  # state dict prefix of the added tensors
CONFIG_KEY = "softmoe_retrofit"  # config.json entry with the settings
FORMAT_VERSION = 1
# Class names that look like an MoE block we do not convert (Qwen3MoeSparseMoeBlock, DeepseekV3MoE, ...).
_MOE_BLOCK_NAME = re.compile(r"(SparseMoeBlock|MoeBlock|MoE|SparseMoe)$")


@dataclass(frozen=True)
class RetrofitConfig:
    """Settings of one conversion (stored in config.json under `softmoe_retrofit`)."""

    # alpha differs from the router's 1.0 on purpose: a small alpha makes the converted model reproduce the
    # original top-k routing (logits equal at conversion); raise it (or learn it) to soften the routing.
    alpha: float = 1e-3  # initial Laplace scale of every layer's soft top-k, logit units (smaller = harder)
    budget: float | None = None  # global mean active experts K; None = the model's num_experts_per_tok
    truncation: str = "relative"  # the paper's relative threshold (see routing/softk.py) or "min_weight"
    threshold: float = 1.8  # relative truncation: keep p >= threshold * k / E, clamped
    cap_factor: float = 2.0  # relative truncation: at most ceil(k * cap_factor) experts per token
    min_weight: float = 0.05  # min_weight truncation: experts with p < min_weight are not computed
    max_active: int | None = None  # optional cap on experts per token
    combine: str | None = None  # None = the model's own convention (see Family.combine_mode)
    learn_k: bool = True  # train the per-layer allocation of the budget
    learn_alpha: bool = False  # train log alpha per layer
    k_min: float = 0.5  # lower bound of every k_l
    margin: float = 0.5  # k_l <= E - margin
    budget_mode: str = "exact"  # "exact" (mean k_l == K always) or "penalty"
    lb_coef: float = 0.0  # weight of our soft-routing load-balance loss in each block's aux_loss
    z_coef: float = 0.0  # weight of our router z-loss in each block's aux_loss

    def __post_init__(self) -> None:
        check_float("alpha", self.alpha, 0.0, open_low=True)
        if self.budget is not None:
            check_float("budget", self.budget, 0.0, open_low=True)
        check_float("min_weight", self.min_weight, 0.0, 1.0)
        if self.combine is not None and self.combine not in COMBINE_MODES:
            raise ValueError(f"combine={self.combine!r} must be None or one of {COMBINE_MODES}")
        check_choice("budget_mode", self.budget_mode, BUDGET_MODES)
        for name in ("learn_k", "learn_alpha"):
            check_bool(name, getattr(self, name))


def soft_blocks(model: nn.Module) -> list[SoftRoutedBlock]:
    """The converted blocks of `model`, in budget order."""
    return sorted((m for m in model.modules() if isinstance(m, SoftRoutedBlock)), key=lambda b: b.index)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every supported MoE block; ValueError naming an unsupported one."""
    found = []
    for name, module in model.named_modules():
        if family_of(module) is not None:
            found.append((name, module))
        elif _MOE_BLOCK_NAME.search(type(module).__name__) and not isinstance(module, SoftRoutedBlock):
            raise ValueError(f"unsupported MoE block {type(module).__name__} at {name or '<root>'}: "
                             f"softmoe.convert supports {[f.block_class for f in FAMILIES]}")
    if not found:
        raise ValueError(f"no MoE block found in {type(model).__name__}: softmoe.convert.from_hf converts "
                         f"models with {[f.block_class for f in FAMILIES]} (a loaded transformers MoE model)")
    return found


def _uniform(found: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """(E, top_k) shared by every block; ValueError naming the first block that differs."""
    shapes = [(name, *check_layout(name, block)) for name, block in found]
    first = shapes[0]
    for name, num_experts, top_k in shapes[1:]:
        if (num_experts, top_k) != first[1:]:
            raise ValueError(f"{name} has {num_experts} experts and top_k={top_k}, but {first[0]} has "
                             f"{first[1]} and {first[2]}: one budget needs the same E and top-k in every block")
    return first[1], first[2]


def _resolve(settings: RetrofitConfig, num_layers: int, num_experts: int, top_k: int,
             combine: str) -> tuple[RetrofitConfig, RetrofitState, SoftKConfig]:
    """The settings with budget and combine resolved, the added state and the routing rule of E experts.

    Budget (in RetrofitState) validates budget / k_min / margin; SoftKConfig validates the rule (k < E,
    max_active) and carries the loss coefficients. Raises ValueError naming the out-of-range option."""
    settings = dataclasses.replace(settings, combine=settings.combine or combine,
                                   budget=float(top_k if settings.budget is None else settings.budget))
    state = RetrofitState(num_layers, num_experts, settings.budget, settings.alpha, settings.learn_alpha,
                          settings.learn_k, settings.k_min, settings.margin, settings.budget_mode)
    rule = SoftKConfig(num_experts=num_experts, k=settings.budget, alpha=settings.alpha,
                       truncation=settings.truncation, threshold=settings.threshold, cap_factor=settings.cap_factor,
                       min_weight=settings.min_weight, max_active=settings.max_active, combine=settings.combine,
                       lb_coef=settings.lb_coef, z_coef=settings.z_coef)
    return settings, state, rule


# Where each family's config.json keeps E (the top-k is num_experts_per_tok in all three).
_NUM_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts"}


def check_model_type(hf_config) -> None:
    """ValueError unless `hf_config` is a Mixtral, Qwen2-MoE or OLMoE config not saved after conversion (an
    exported softmoe model, another model type and a converted folder are named as such)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _NUM_EXPERTS_KEY:
        what = ("an exported softmoe model (it routes with SoftMoE already)" if model_type == "softmoe"
                else f"a {model_type!r} model")
        raise ValueError(f"it is {what}: softmoe convert takes Mixtral, Qwen2-MoE or OLMoE folders "
                         f"(model_type {sorted(_NUM_EXPERTS_KEY)})")
    if getattr(hf_config, CONFIG_KEY, None) is not None:
        raise ValueError("it was saved after conversion (config.json has a 'softmoe_retrofit' entry): load it "
                         "with softmoe.convert.from_pretrained(path)")


def check_options(hf_config, alpha: float = RetrofitConfig.alpha, **options) -> None:
    """Check a conversion's options against a transformers config before any weight is loaded (`softmoe convert`
    on a large model): the same checks as `from_hf`, with E and the top-k read from the config (see
    `check_model_type` first).

    Raises:
        ValueError: an unknown option or an out-of-range value (named).
    """
    check_model_type(hf_config)
    model_type = hf_config.model_type
    settings = _settings(alpha, options)
    num_experts = int(getattr(hf_config, _NUM_EXPERTS_KEY[model_type]))
    family = next(family for family in FAMILIES if family.name == model_type)
    _resolve(settings, 1, num_experts, int(hf_config.num_experts_per_tok),  # the checks do not depend on L
             family.combine_mode(hf_config))


def _settings(alpha: float, options: dict) -> RetrofitConfig:
    valid = {f.name for f in dataclasses.fields(RetrofitConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for from_hf; valid options: {sorted(valid)}")
    return RetrofitConfig(alpha=alpha, **options)


def _convert(model: nn.Module, settings: RetrofitConfig) -> RetrofitConfig:
    """Replace the blocks in place; returns the settings with budget and combine resolved."""
    found = _find_blocks(model)
    num_experts, top_k = _uniform(found)
    family = family_of(found[0][1])
    settings, state, rule = _resolve(settings, len(found), num_experts, top_k,
                                     family.combine_mode(found[0][1].gate))
    state.to(found[0][1].gate.weight.device)
    for index, (name, block) in enumerate(found):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, SoftRoutedBlock(block, family_of(block), rule, state, index))
    model.softmoe_retrofit = state
    return settings


def from_hf(model: nn.Module, alpha: float = RetrofitConfig.alpha, **options) -> nn.Module:
    """Give a loaded transformers MoE model SoftMoE routing, in place; returns the same model.

    Supported blocks: MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, OlmoeSparseMoeBlock (transformers
    5.x fused experts). Every block's gate and experts are reused as they are (no copies).

    Args:
        model: a transformers model holding the blocks (e.g. MixtralForCausalLM, or its base model).
        alpha: initial soft top-k scale in logit units; small alpha reproduces the original top-k.
        **options: the other RetrofitConfig fields (budget, min_weight, max_active, combine, learn_k,
            learn_alpha, k_min, margin, budget_mode, lb_coef, z_coef).
    Raises:
        TypeError: model is not an nn.Module; an option has the wrong type.
        ValueError: no supported MoE block, an unsupported block or expert layout, an unknown option,
            an out-of-range value, or a model that is already converted (or was saved converted and
            loaded without softmoe: use softmoe.convert.from_pretrained).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    if isinstance(getattr(model, CONFIG_KEY, None), RetrofitState):
        raise ValueError(f"{type(model).__name__} is already converted (it has model.{CONFIG_KEY})")
    config = getattr(model, "config", None)
    if getattr(config, CONFIG_KEY, None) is not None:
        raise ValueError(f"{type(model).__name__}.config has a {CONFIG_KEY!r} entry: it was saved after "
                         "conversion and loaded without its SoftMoE state (learned k_l and alpha); load it "
                         "with softmoe.convert.from_pretrained(path)")
    settings = _convert(model, _settings(alpha, options))
    if config is not None:
        setattr(config, CONFIG_KEY, {"version": FORMAT_VERSION, **dataclasses.asdict(settings)})
    return model


def _retrofit_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The `softmoe_retrofit.*` tensors of a saved folder (single or sharded safetensors), prefix removed."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(STATE_PREFIX):
                    tensors[key[len(STATE_PREFIX):]] = f.get_tensor(key)
    return tensors


def from_pretrained(path: str | Path, **hf_kwargs) -> nn.Module:
    """Load a folder written by `save_pretrained` after `from_hf`: the converted model, exactly.

    Args:
        path: a local transformers folder whose config.json has a `softmoe_retrofit` entry.
        **hf_kwargs: passed to AutoModelForCausalLM.from_pretrained (e.g. torch_dtype).
    Raises:
        ValueError: path is not a folder, has no `softmoe_retrofit` entry, or lacks the saved SoftMoE
            tensors; other missing weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path={str(path)!r} is not a local folder written by save_pretrained")
    config = AutoConfig.from_pretrained(path)
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or entry.get("version") != FORMAT_VERSION:
        raise ValueError(f"path={str(path)!r}: config.json has no {CONFIG_KEY!r} entry of version "
                         f"{FORMAT_VERSION} (got {entry!r}); convert an HF model with softmoe.convert.from_hf")
    saved = {k: v for k, v in entry.items() if k != "version"}
    # Folders saved before the paper's rule became the default truncated at min_weight: keep their rule.
    saved.setdefault("truncation", "min_weight")
    settings = RetrofitConfig(**saved)
    delattr(config, CONFIG_KEY)
    # The saved softmoe_retrofit.* tensors are "unexpected" to the HF class; we restore them below, so its
    # load report is silenced here and the missing / unexpected keys are checked by us instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, output_loading_info=True,
                                                           **hf_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(STATE_PREFIX))
    missing = sorted(info.get("missing_keys", ()))
    if missing or unexpected:
        raise ValueError(f"path={str(path)!r}: weights do not match {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    _convert(model, settings)
    tensors = _retrofit_tensors(path)
    want = set(model.softmoe_retrofit.state_dict())
    if set(tensors) != want:
        raise ValueError(f"path={str(path)!r}: saved SoftMoE tensors {sorted(tensors)} do not match the "
                         f"converted model's {sorted(want)}")
    model.softmoe_retrofit.load_state_dict(tensors)
    setattr(model.config, CONFIG_KEY, entry)
    return model
