"""Retrofit a saved transformers MoE folder: load it, convert its MoE blocks (retrofit.from_hf), save it with
its tokenizer files (`softmoe convert`)."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

from softmoe.common.atomic import check_new_folder, write_new_folder

__all__ = ["convert_folder"]

# Files that travel with the weights but are not written by save_pretrained.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def convert_folder(model_dir: Path, out: Path, report=print, **options) -> Path:
    """Load `model_dir`, convert it with from_hf(**options), save to `out` with its tokenizer files.

    The options and the model type are checked before the weights are loaded; `out` must be new or an empty
    folder, and is written whole (staged next to it, then renamed). ValueError names the argument at fault."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from softmoe.convert.retrofit import check_model_type, check_options, from_hf, soft_blocks

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--checkpoint {str(model_dir)!r} is not a transformers folder (no config.json)")
    config = _read_config(AutoConfig, model_dir)
    try:  # the model type and the options, before minutes of loading a large model's weights
        check_model_type(config)
    except ValueError as err:
        raise ValueError(f"--checkpoint {str(model_dir)!r}: {err}") from None
    check_options(config, **options)  # an option's error names the option (the CLI spells it as its flag)
    check_new_folder(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from_hf(model, **options)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        for name in _TOKENIZER_FILES:
            if (Path(model_dir) / name).is_file() and not (folder / name).exists():
                shutil.copy2(Path(model_dir) / name, folder / name)

    out = write_new_folder(out, fill)
    k_L = model.softmoe_retrofit.budget().tolist()
    report(f"converted {len(soft_blocks(model))} {type(model).__name__} MoE blocks (k_l = {k_L}, "
           f"combine={model.config.softmoe_retrofit['combine']}) -> {out}")
    return out


def _read_config(auto_config, model_dir: Path):
    """The folder's transformers config, read without custom code; for a model type transformers does not know
    (an exported softmoe folder names its classes in auto_map) its config.json fields, model_type among them."""
    try:
        return auto_config.from_pretrained(model_dir)
    except (ValueError, KeyError) as err:
        try:
            raw = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError):
            raise ValueError(f"--checkpoint {str(model_dir)!r}: its config.json cannot be read ({err})") from None
        return types.SimpleNamespace(**raw) if isinstance(raw, dict) else types.SimpleNamespace()
