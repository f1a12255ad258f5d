"""Integrity of exported folders: a sha256 manifest written last, checked by softmoe's loaders.

`softmoe export` (and `SoftMoEForCausalLM.save_pretrained`) write `softmoe_manifest.json` next to the files:

    {"format": 1, "files": {"model.safetensors": {"sha256": "...", "bytes": 123}, "config.json": {...}, ...}}

transformers' own loader checks none of this: safetensors parses the header and the tensor sizes, so a flipped
byte inside the tensor data (or an edited config value that still parses) loads silently. softmoe's loaders
(`SoftMoEForCausalLM.from_pretrained`, also reached through the Auto classes and `softmoe lm-eval`) verify the
weights and config files the manifest lists; `verify_export(folder)` checks every listed file (tokenizer too).
A folder without a manifest (exported by an older softmoe, or saved by other code) loads unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path

from softmoe.common.atomic import atomic_write_json
from softmoe.data.io import sha256_file

__all__ = ["MANIFEST", "ExportIntegrityError", "write_manifest", "verify_export", "is_model_file"]

MANIFEST = "softmoe_manifest.json"
FORMAT = 1


class ExportIntegrityError(ValueError):
    """A file of an exported folder does not match its manifest (corrupt, truncated, missing or replaced)."""


def is_model_file(name: str) -> bool:
    """Whether `name` is read when the model loads (weights, their index, config): what from_pretrained checks."""
    return name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json",
                                                     "generation_config.json")


def write_manifest(folder: Path) -> Path:
    """Hash every regular file in `folder` (the manifest itself excepted) into its manifest; returns its path."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    listing = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "files": listing})
    return folder / MANIFEST


def verify_export(folder: Path, select=lambda name: True) -> list[str] | None:
    """Check the files of `folder` that its manifest lists (and `select` accepts) against their sha256.

    Returns:
        The names checked, or None when the folder has no manifest (nothing to check).
    Raises:
        ExportIntegrityError naming the file, when one is missing or differs, or the manifest is unreadable.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        listing = json.loads(path.read_text())["files"]
        entries = {name: (entry["sha256"], entry["bytes"]) for name, entry in listing.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ExportIntegrityError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
    checked = []
    for name, (digest, size) in sorted(entries.items()):
        if not select(name):
            continue
        file = folder / name
        if not file.is_file():
            raise ExportIntegrityError(f"{file}: listed in {MANIFEST} but missing")
        actual = sha256_file(file)
        if actual != digest or file.stat().st_size != size:
            raise ExportIntegrityError(f"{file}: sha256 {actual[:12]}... ({file.stat().st_size:,} bytes) differs "
                                       f"from {MANIFEST}'s {digest[:12]}... ({size:,} bytes): the file is corrupt "
                                       f"or was replaced; export the checkpoint again")
        checked.append(name)
    return checked
