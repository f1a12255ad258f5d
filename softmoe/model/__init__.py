"""The language model: config, attention with RoPE and KV cache, blocks, the GPT decoder, generation.

The transformers classes (SoftMoEConfig, SoftMoEForCausalLM) live above model and train, in softmoe.export.
"""

from softmoe.model.config import ModelConfig
from softmoe.model.decoder import GPT, DecoderOutput
from softmoe.model.generate import generate, sample_next

__all__ = ["ModelConfig", "GPT", "DecoderOutput", "generate", "sample_next"]
