"""`softmoe export`: a training checkpoint as a transformers folder (config.json, model.safetensors, tokenizer).

The folder loads with `SoftMoEForCausalLM.from_pretrained(folder)`, or with the Auto classes after
`softmoe.export.register()` or with `trust_remote_code=True` (config.json's auto_map; softmoe/export/hf.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from softmoe.common.atomic import check_new_folder, write_new_folder
from softmoe.data.tokenizer import EOT
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM
from softmoe.export.manifest import write_manifest
from softmoe.train.restore import load_for_inference

__all__ = ["hf_tokenizer", "export_checkpoint"]


def hf_tokenizer(tokenizer_file: str | Path, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Our tokenizer.json as a PreTrainedTokenizerFast.

    The BPE's <|endoftext|> (token 0, when present) is bos, eos and pad (GPT-2's convention: the model has
    no separate padding token, and padding positions are masked by attention_mask, not by their id).
    `model_max_length` is the model's context (max_seq_len), so `tokenizer(..., truncation=True)` and
    transformers' pipelines cut where the model must.
    """
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    if EOT in tok.get_vocab():
        tok.bos_token = tok.eos_token = tok.pad_token = EOT
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    return tok


def export_checkpoint(checkpoint: str | Path, out: str | Path,
                      report: Callable[[str], None] = print) -> Path:
    """Write a training checkpoint as a transformers folder (config.json, model.safetensors, tokenizer, and
    softmoe_manifest.json with every file's sha256).

    `out` must not exist or be empty (ValueError otherwise: nothing of another folder is overwritten). The folder
    is written next to it under a temporary name and renamed into place, so it is complete or absent.
    """
    out = Path(out)
    check_new_folder(out)  # before loading the checkpoint
    gpt, _, path = load_for_inference(checkpoint, report)
    model = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(gpt.config))
    model.model.load_state_dict(gpt.state_dict())

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        hf_tokenizer(path / "tokenizer.json", model_max_length=gpt.config.max_seq_len).save_pretrained(folder)
        write_manifest(folder)  # last: it covers the tokenizer files too

    write_new_folder(out, fill)
    report(f"exported {path} -> {out}")
    return out
