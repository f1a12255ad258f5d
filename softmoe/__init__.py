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

from softmoe.common.lazy import lazy_exports

__version__ = "0.1.0"

_WHERE = {
    "soft_topk": "softmoe.ops.lapsum",
    "MoELayer": "softmoe.layers.moe",
    "MoEOutput": "softmoe.layers.moe",
    "SoftMoEBudget": "softmoe.layers.budgeted",
    "Budget": "softmoe.routing.budget",
    "GPT": "softmoe.model.decoder",
    "ModelConfig": "softmoe.model.config",
    "load_model": "softmoe.train.restore",
    "SoftMoEConfig": "softmoe.export.hf",
    "SoftMoEForCausalLM": "softmoe.export.hf",
    "register_hf": ("softmoe.export.hf", "register"),
}

__all__ = ["__version__", *_WHERE]
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, eager=__all__)
