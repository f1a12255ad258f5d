"""Retrofit transformers MoE models (Mixtral, Qwen2-MoE, OLMoE) with SoftMoE routing: see docs/retrofit.md."""

from softmoe.common.lazy import lazy_exports

# Loaded on first use, so that importing this package imports no torch.
_WHERE = {name: "softmoe.convert.retrofit"
          for name in ("from_hf", "from_pretrained", "RetrofitConfig", "soft_blocks", "CONFIG_KEY", "STATE_PREFIX")}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
