"""Retrofit transformers MoE models (Mixtral, Qwen2-MoE, OLMoE) with SoftMoE routing: see docs/retrofit.md."""

import importlib

_WHERE = {name: "softmoe.convert.retrofit"
          for name in ("from_hf", "from_pretrained", "RetrofitConfig", "soft_blocks", "CONFIG_KEY", "STATE_PREFIX")}

__all__ = list(_WHERE)


def __getattr__(name: str):
    # Loaded on first use, so that `softmoe --help` (which imports this package's cli module) imports no torch.
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
