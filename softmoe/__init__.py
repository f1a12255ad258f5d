"""softmoe: Mixture-of-Experts with a differentiable truncated LapSum soft top-k router.

Importing softmoe makes the "softmoe" model type known to transformers' AutoConfig / AutoModelForCausalLM,
so `import softmoe` then `AutoModelForCausalLM.from_pretrained(exported_dir)` works. Registering needs
transformers and torch (about 4-5 s of imports on a CPU box, against ~30 ms for `import softmoe`), so it
is done when transformers itself is imported: at once if it already is, otherwise by a one-shot import
hook that runs `softmoe.model.hf` (whose import registers) right after the `transformers` package loads.
A process that never imports transformers never pays for it.
"""

import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

__all__ = ["__version__", "SoftMoEConfig", "SoftMoEForCausalLM"]


def _register_with_transformers() -> None:
    try:
        import softmoe.model.hf  # noqa: F401  (importing it registers the Auto classes)
    except Exception as err:  # never break `import transformers` because of us
        warnings.warn(f"softmoe could not register its model type with transformers: {err!r}", stacklevel=2)


class _RegisterOnLoad(importlib.abc.Loader):
    """Wraps transformers' loader: run the package as usual, then register."""

    def __init__(self, spec):
        self.spec, self.loader = spec, spec.loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.spec.loader = self.loader  # put the real loader back before anything else looks at it
        self.loader.exec_module(module)
        _register_with_transformers()


class _TransformersHook(importlib.abc.MetaPathFinder):
    """One-shot finder for the top-level `transformers` package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterOnLoad(spec)
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _TransformersHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TransformersHook())


def __getattr__(name: str):
    if name in ("SoftMoEConfig", "SoftMoEForCausalLM"):
        from softmoe.model import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'softmoe' has no attribute {name!r}")
