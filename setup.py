"""Build hook: ship the YAML presets (configs/) inside the package as softmoe/configs/ (see softmoe/common/presets.py).

Everything else is in pyproject.toml. The presets stay at the repository root for users of a clone.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPresets(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "configs"
        if source.is_dir() and not self.editable_mode:
            target = Path(self.build_lib) / "softmoe" / "configs"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithPresets})
