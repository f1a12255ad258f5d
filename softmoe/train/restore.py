"""Rebuild a trained model (and its tokenizer) from a checkpoint, for generation and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from softmoe.common.precision import resolve_device
from softmoe.model import GPT
from softmoe.train.checkpoint import load_checkpoint, resolve_checkpoint
from softmoe.train.config import RunConfig, run_config_from_dict

__all__ = ["load_for_inference", "load_model"]


def load_model(checkpoint: str | Path, report: Callable[[str], None] = print,
               device: str = "cpu") -> tuple[GPT, RunConfig, Path]:
    """The model of a checkpoint (or of the newest good checkpoint of a run directory), in eval mode.

    `device`: where the model is placed ("auto": CUDA when available; see softmoe/common/precision.py).

    Returns:
        (model, run config it was trained with, the checkpoint directory used).
    """
    target = resolve_device(device)
    path = resolve_checkpoint(Path(checkpoint), report)
    model_state, _, meta = load_checkpoint(path)
    config = run_config_from_dict(meta["config"])
    model = GPT(config.model)
    model.load_state_dict(model_state)
    return model.to(target).eval(), config, path


def load_for_inference(checkpoint: str | Path, report: Callable[[str], None] = print,
                       device: str = "cpu") -> tuple[GPT, Tokenizer, Path]:
    """(model on `device`, tokenizer, checkpoint dir). The tokenizer is the copy saved inside the checkpoint."""
    model, _, path = load_model(checkpoint, report, device)
    tokenizer_path = path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ValueError(f"{path}: checkpoint has no tokenizer.json, cannot encode a prompt")
    return model, Tokenizer.from_file(str(tokenizer_path)), path
