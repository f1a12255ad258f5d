"""The transformers integration, above model and train: SoftMoEConfig / SoftMoEForCausalLM (export/hf.py) and
`softmoe export` (export/checkpoint.py). Importing this package is cheap: transformers loads with the first
name used from it."""

__all__ = ["SoftMoEConfig", "SoftMoEForCausalLM", "register", "hf_tokenizer", "export_checkpoint", "cmd_export"]

_WHERE = {"SoftMoEConfig": "hf", "SoftMoEForCausalLM": "hf", "register": "hf",
          "hf_tokenizer": "checkpoint", "export_checkpoint": "checkpoint", "cmd_export": "checkpoint"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"softmoe.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'softmoe.export' has no attribute {name!r}")
