"""Names a package exports but loads on first use (PEP 562), so importing the package stays cheap.

    __getattr__, __dir__ = lazy_exports(__name__, {"soft_topk": "softmoe.ops.lapsum", ...}, eager=[...])

`where` maps each exported name to the module that defines it, or to (module, name there) when the package
exports it under another name. `softmoe --help` imports the packages' cli modules and so their
`__init__`: with their heavy names lazy it imports no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str | tuple[str, str]], eager: Iterable[str] = ()
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`: a name of `where` is imported from its module when first
    read; `eager` lists the names the package defines itself (they appear in `dir()` too)."""
    names = sorted({*where, *eager})

    def __getattr__(name: str):
        if name in where:
            module, attr = where[name] if isinstance(where[name], tuple) else (where[name], name)
            return getattr(importlib.import_module(module), attr)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
