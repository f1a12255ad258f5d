"""Optional dependencies, imported on first use with a message naming the extra that installs them.

The core (`pip install softmoe`) is the layer, the model, training, evaluation and the CLI. Plots and
TensorBoard need `softmoe[viz]`, export / convert / transformers loading `softmoe[hf]`, the lm-eval
passthrough `softmoe[lm-eval]`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: "<purpose> needs <module>: pip install 'softmoe[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name != module and not module.startswith(err.name + "."):
            raise  # the module is there but itself fails to import: not a missing extra
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'softmoe[{extra}]'") from None
