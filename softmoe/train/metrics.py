"""Training metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard.

Records look like {"step": 100, "split": "train", "loss": 3.2, ..., "layers": [{per MoE layer}]}.
Per-layer routing stats come from DecoderOutput.routing and are converted to plain floats/lists.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from softmoe.routing.diagnostics import COUNT_KEYS

__all__ = ["MetricsWriter", "routing_summary", "with_load_window", "mean_active_experts", "train_ae", "read_metrics",
           "DIAGNOSTIC_KEYS"]

# The per-layer routing diagnostics every MoE record carries (docs/training.md, "What a run writes"):
#   k                   the layer's nominal k: the soft top-k mass k_l of a SoftMoE budget, top-k's k
#   active_experts_mean the realized count AE: mean experts per token with a nonzero weight
#   active_experts_hist tokens using exactly j experts, j = 0..E
#   logit_spread        mean over tokens of the std over experts of the fp32 router logits
#   weight_sum_mean     mean per token of the summed combine weights (the MoE output's scale)
#   expert_load         each expert's share of the routed pairs (train: over the logging window)
#   load_max_over_mean, load_cv, dead_fraction   of that load (dead: below 10% of uniform)
DIAGNOSTIC_KEYS = ("k", "active_experts_mean", "active_experts_hist", "logit_spread", "weight_sum_mean",
                   "expert_load", "load_max_over_mean", "load_cv", "dead_fraction")


def _plain(value):
    """Tensors and numbers -> JSON-friendly floats / lists."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_RAW_COUNTS = COUNT_KEYS  # what the controllers and RoutingCounts read; records carry fractions


def routing_summary(routing: Mapping[int, Mapping[str, torch.Tensor]]) -> list[dict]:
    """One JSON-friendly dict per MoE layer: its "block" index and its stats as floats / lists (the one place
    routing stats become numbers). "k" is the layer's own report (softmoe: the budget's k_l).

    The raw counts (`expert_counts`, `real_tokens`) are left out (the load fractions and `RoutingCounts` carry them)."""
    return [{"block": block, **{key: _plain(value) for key, value in stats.items() if key not in _RAW_COUNTS}}
            for block, stats in routing.items()]


def with_load_window(layers: list[dict], window) -> list[dict]:
    """`layers` (routing_summary records) with each layer's load numbers replaced by those of `window`
    (a routing.diagnostics.RoutingCounts over many forwards): expert_load, load_max_over_mean, load_cv, dead_fraction."""
    summary = window.summary()
    out = []
    for layer in layers:
        over = summary.get(layer.get("block"))
        out.append(layer if over is None else {**layer, **{key: _plain(value) for key, value in over.items()}})
    return out


def mean_active_experts(layers: list[dict]) -> float | None:
    """Average over MoE layers of the realized mean active experts per token (None without MoE)."""
    values = [layer["active_experts_mean"] for layer in layers if "active_experts_mean" in layer]
    return sum(values) / len(values) if values else None


def train_ae(records: list[dict], tail: float = 0.2) -> tuple[float | None, list[float]]:
    """Train AE (the paper's name): realized mean active experts per token in training mode.

    Averaged over the train records of the last `tail` fraction of steps (the settled value; early steps route
    differently), per layer and over layers: a record at step s covers the steps since the previous record, so
    the records ending after step (1 - tail) * last, the last `tail` of the steps widened to whole log windows
    (of 625 steps logged every 25: the records of steps 525-625, which cover steps 501-625 exactly; of 600: those
    of 500-600, covering 476-600). (None, []) without MoE records.
    """
    rows = [r for r in records if r.get("split") == "train" and r.get("active_experts_mean") is not None]
    if not rows:
        return None, []
    last = max(r["step"] for r in rows)
    rows = [r for r in rows if r["step"] > last * (1.0 - tail)]
    per_layer = [sum(r["layers"][i]["active_experts_mean"] for r in rows) / len(rows)
                 for i in range(len(rows[0]["layers"]))]
    return sum(r["active_experts_mean"] for r in rows) / len(rows), per_layer


class MetricsWriter:
    """Appends records to `<run_dir>/metrics.jsonl` (flushed per line) and scalars to TensorBoard.

    `enabled=False` writes nothing (the non-zero ranks of a distributed run).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None,
                 report: Callable[[str], None] = print, enabled: bool = True):
        """
        Args:
            tensorboard: also write TensorBoard events (needs the `viz` extra; skipped with a note if missing).
            purge_step: a resumed run's step: TensorBoard hides the crashed session's events from this step on,
                and the records kept in metrics.jsonl at this step are written again.
            enabled: False writes nothing.
        """
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for
            except ImportError:
                report("tensorboard is not installed (pip install 'softmoe[viz]'); metrics go to metrics.jsonl only")
                return
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
            if purge_step is not None:
                for record in read_metrics(run_dir):
                    if record.get("step") == purge_step:
                        self._to_tensorboard(record)

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        record = _plain(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        step, split = record["step"], record["split"]
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        for layer in record.get("layers", []):
            for key in DIAGNOSTIC_KEYS:
                if isinstance(layer.get(key), (int, float)):
                    self._tb.add_scalar(f"{split}/{key}/block{layer.get('block', '?')}", layer[key], step)
            if isinstance(layer.get("expert_load"), list) and layer["expert_load"]:
                self._tb.add_histogram(f"{split}/expert_load/block{layer.get('block', '?')}",
                                       torch.tensor(layer["expert_load"]), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    @staticmethod
    def truncate_after(run_dir: Path, step: int, keep: Callable[[dict], bool] | None = None) -> None:
        """Drop records with step > `step` (a resumed run re-logs them), and those at `step` that `keep`
        rejects (a stopped session's off-schedule records), rewriting the file atomically."""
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if (record := _parse(line)) and
                (record["step"] < step or (record["step"] == step and (keep is None or keep(record))))]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    """All records of a run (optionally one split), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [record for line in path.read_text().splitlines() if (record := _parse(line))]
    return [r for r in records if split is None or r["split"] == split]


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line or the torn last line of a run killed mid-write."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
