"""Retrofit a saved transformers MoE folder: load it, convert its MoE blocks (retrofit.from_hf), save it with
its tokenizer files (`softmoe convert`)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["convert_folder"]

# Files that travel with the weights but are not written by save_pretrained.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def convert_folder(model_dir: Path, out: Path, report=print, **options) -> Path:
    """Load `model_dir`, convert it with from_hf(**options), save to `out` with its tokenizer files."""
    from transformers import AutoModelForCausalLM

    from softmoe.convert.retrofit import from_hf, soft_blocks

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--checkpoint {str(model_dir)!r} is not a transformers folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from_hf(model, **options)
    out = Path(out)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file() and not (out / name).exists():
            shutil.copy2(Path(model_dir) / name, out / name)
    k_L = model.softmoe_retrofit.budget().tolist()
    report(f"converted {len(soft_blocks(model))} {type(model).__name__} MoE blocks (k_l = {k_L}, "
           f"combine={model.config.softmoe_retrofit['combine']}) -> {out}")
    return out
