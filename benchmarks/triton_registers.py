"""Registers and spills of the fused LapSum kernels per row width, from ptxas (no GPU needed).

Compiles both kernels (every branch) for sm_90 with softmoe.ops.lapsum_triton.compile_kernels and runs the
ptxas bundled in the triton wheel with -v on each PTX. Spills mean the rows per program
(`lapsum_triton._ENTRIES_PER_PROGRAM`) are too many for the register file.

Run (TRITON_INTERPRET must be unset):
    .venv/bin/python benchmarks/triton_registers.py [--arch 90] [--entries 16 64 512]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from softmoe.ops.lapsum_triton import compile_kernels  # noqa: E402


def ptxas_report(ptx: str, arch: str) -> str:
    """'N registers, S bytes spilled' for one PTX module."""
    import triton

    ptxas = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", f"-arch={arch}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text).group(1)
    spilled = re.search(r"(\d+) bytes spill stores", text).group(1)
    return f"{registers} registers, {spilled} bytes spilled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--entries", type=int, nargs="+", default=[16, 64, 512], help="row widths n")
    args = parser.parse_args()
    for n in args.entries:
        for name, compiled in compile_kernels(arch=args.arch, n=n).items():
            target = re.search(r"\.target (\S+)", compiled.asm["ptx"]).group(1)
            print(f"n={n:4d} {name:8s} {ptxas_report(compiled.asm['ptx'], target)}")


if __name__ == "__main__":
    main()
