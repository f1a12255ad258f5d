"""The one timing helper every benchmark uses: warmup, repeats, median and IQR, recorded context.

The machine is shared and noisy, so a benchmark compares candidates measured in the same run,
interleaved repeat by repeat, and reports ratios of medians rather than absolute claims.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate."""

    median: float
    q1: float
    q3: float
    repeats: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA's synchronize; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, Timing]:
    """Time several zero-argument callables, alternating between them on every repeat.

    Interleaving spreads background load over all candidates equally, so ratios stay meaningful.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    out = {}
    for name, values in samples.items():
        q1, median, q3 = _quartiles(values)
        out[name] = Timing(median=median, q1=q1, q3=q3, repeats=repeats)
    return out


def machine_info() -> dict[str, object]:
    """Where the numbers were measured."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>.json with the rows, the machine and the time."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    payload.update(extra or {})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def timing_dict(t: Timing) -> dict[str, float]:
    return {k: v for k, v in asdict(t).items()}
