"""The language model: config, attention with RoPE and KV cache, blocks, the GPT decoder, generation."""

from softmoe.model.config import ModelConfig
from softmoe.model.decoder import GPT, DecoderOutput
from softmoe.model.generate import generate, sample_next

__all__ = ["ModelConfig", "GPT", "DecoderOutput", "generate", "sample_next",
           "SoftMoEConfig", "SoftMoEForCausalLM"]


def __getattr__(name: str):
    # The transformers classes load on first use: importing transformers costs seconds, and doing so
    # registers "softmoe" with AutoConfig / AutoModelForCausalLM (softmoe.model.hf).
    if name in ("SoftMoEConfig", "SoftMoEForCausalLM"):
        from softmoe.model import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'softmoe.model' has no attribute {name!r}")
