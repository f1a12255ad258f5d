"""The transformers integration, above model and train: SoftMoEConfig / SoftMoEForCausalLM (export/hf.py) and
`softmoe export` (export/checkpoint.py). Importing this package is cheap: transformers loads with the first
name used from it."""

from softmoe.common.lazy import lazy_exports

__all__ = ["SoftMoEConfig", "SoftMoEForCausalLM", "register", "hf_tokenizer", "export_checkpoint"]

_WHERE = {**{name: "softmoe.export.hf" for name in ("SoftMoEConfig", "SoftMoEForCausalLM", "register")},
          **{name: "softmoe.export.checkpoint" for name in ("hf_tokenizer", "export_checkpoint")}}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
