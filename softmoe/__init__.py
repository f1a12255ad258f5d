"""softmoe: Mixture-of-Experts with a differentiable truncated LapSum soft top-k router.

The main names, loaded on first use (so `import softmoe` imports neither torch nor transformers, and has no
side effects):

    soft_topk                      the LapSum soft top-k (softmoe.ops)
    MoELayer, MoEOutput            the MoE layer and what its forward returns (softmoe.layers)
    SoftMoEBudget, Budget          the learned global budget over MoE layers in any model; its k_l module
    GPT, ModelConfig               the native decoder and its config (softmoe.model)
    load_model                     a native training checkpoint (or run directory) -> (GPT, RunConfig, path)
    SoftMoEConfig, SoftMoEForCausalLM, register_hf
                                   the transformers classes and their AutoConfig / AutoModelForCausalLM
                                   registration (softmoe.export; needs the `hf` extra)
"""

import importlib

__version__ = "0.1.0"

_WHERE = {
    "soft_topk": ("softmoe.ops.lapsum", "soft_topk"),
    "MoELayer": ("softmoe.layers.moe", "MoELayer"),
    "MoEOutput": ("softmoe.layers.moe", "MoEOutput"),
    "SoftMoEBudget": ("softmoe.layers.budgeted", "SoftMoEBudget"),
    "Budget": ("softmoe.routing.budget", "Budget"),
    "GPT": ("softmoe.model.decoder", "GPT"),
    "ModelConfig": ("softmoe.model.config", "ModelConfig"),
    "load_model": ("softmoe.train.restore", "load_model"),
    "SoftMoEConfig": ("softmoe.export.hf", "SoftMoEConfig"),
    "SoftMoEForCausalLM": ("softmoe.export.hf", "SoftMoEForCausalLM"),
    "register_hf": ("softmoe.export.hf", "register"),
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        module, attr = _WHERE[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'softmoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
