"""Where the YAML presets live: `configs/` of a source checkout, or `softmoe/configs/` of an installed wheel.

The wheel carries the presets as package data (setup.py copies `configs/` into the package when it is
built), so `softmoe main --preset tiny` and `softmoe train --config tiny/softmoe.yaml` work after
`pip install softmoe` as they do in a clone.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["presets_dir", "find_config"]


def presets_dir() -> Path:
    """The directory holding `<size>/<variant>.yaml` and `studies/`."""
    package = Path(__file__).resolve().parents[1]  # softmoe/
    packaged = package / "configs"
    if packaged.is_dir():  # an installed wheel
        return packaged
    return package.parent / "configs"  # a source checkout


def find_config(path: str | Path) -> Path:
    """`path` itself if it exists, else the preset of that name (`tiny/softmoe`, `configs/tiny/softmoe.yaml`)."""
    path = Path(path)
    if path.exists():
        return path
    name = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (presets_dir() / name, presets_dir() / name.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    return path
