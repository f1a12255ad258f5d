"""Retrofit transformers MoE models (Mixtral, Qwen2-MoE, OLMoE) with SoftMoE routing: see docs/retrofit.md."""

from softmoe.convert.retrofit import CONFIG_KEY, STATE_PREFIX, RetrofitConfig, from_hf, from_pretrained, soft_blocks

__all__ = ["from_hf", "from_pretrained", "RetrofitConfig", "soft_blocks", "CONFIG_KEY", "STATE_PREFIX"]
