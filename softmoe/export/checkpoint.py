"""`softmoe export`: a training checkpoint as a transformers folder (config.json, model.safetensors, tokenizer).

The folder loads with `SoftMoEForCausalLM.from_pretrained(folder)`, or with the Auto classes after
`softmoe.export.register()` or with `trust_remote_code=True` (config.json's auto_map; softmoe/export/hf.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from softmoe.data.tokenizer import EOT
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM
from softmoe.train.checkpoint import CheckpointError
from softmoe.train.restore import load_for_inference

__all__ = ["hf_tokenizer", "export_checkpoint", "cmd_export"]


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
    """Write a training checkpoint as a transformers folder (config.json, model.safetensors, tokenizer)."""
    gpt, _, path = load_for_inference(checkpoint, report)
    model = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(gpt.config))
    model.model.load_state_dict(gpt.state_dict())
    out = Path(out)
    model.save_pretrained(out)
    hf_tokenizer(path / "tokenizer.json", model_max_length=gpt.config.max_seq_len).save_pretrained(out)
    report(f"exported {path} -> {out}")
    return out


def cmd_export(args) -> int:
    """`softmoe export --checkpoint DIR --out HF_DIR` (its parser is in softmoe/cli.py)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"softmoe export: --out {str(out)!r} is an existing file, not a folder", file=sys.stderr)
        return 2
    try:
        export_checkpoint(args.checkpoint, out)
    except (CheckpointError, ValueError, OSError) as err:
        print(f"softmoe export: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
