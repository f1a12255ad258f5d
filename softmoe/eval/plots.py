"""The plot helpers every figure of the project uses: matplotlib on first use (the `viz` extra), shared axes
styling, and an atomic PNG write."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

from softmoe.common.extras import require

__all__ = ["panel_grid", "pyplot", "save_figure", "style_axes", "wrapped"]


def pyplot():
    """matplotlib.pyplot, imported on the first plot (the `viz` extra): on the file-only Agg backend unless the
    process already imported pyplot (then its backend is left alone: switching would close its figures)."""
    matplotlib = require("matplotlib", "viz", "plotting")
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def style_axes(ax, xlabel: str, ylabel: str, title: str, grid_axis: str = "both", legend_size: int = 8,
               legend_cols: int = 1, legend_outside: bool = False) -> None:
    """The labels, grid and legend every plot of the project uses (legend_size 0: no legend).

    legend_outside puts the legend right of the axes, for plots with many series."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid_axis)
    if legend_size:
        where = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if legend_outside else {}
        ax.legend(fontsize=legend_size, ncol=legend_cols, **where)


def save_figure(fig, path: Path) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps it (colour bars)
        fig.tight_layout()
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # keeps a legend placed outside the axes
    plt.close(fig)
    tmp.replace(path)
    return path


def panel_grid(count: int, width: float, height: float, columns: int = 4, **subplots):
    """(figure, the first `count` axes in reading order) of a grid of at most `columns` panels a row, each
    width x height inches; the unused panels of the last row are hidden. Keeps one panel per variant readable
    when a study has eight variants (one row of eight put the titles on top of each other)."""
    plt = pyplot()
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, **subplots)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def wrapped(title: str, width: int = 42) -> str:
    """A panel title broken into lines of at most `width` characters."""
    return "\n".join(textwrap.wrap(title, width)) or title
