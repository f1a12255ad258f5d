"""Padding in SoftMoEForCausalLM and GPT: a left-padded batch (what `generate` and lm-eval's HFLM use for
batched generation) gives every row the logits, routing and greedy tokens of that row alone; sampling runs;
holes in the mask are refused; lm-eval's HFLM.generate_until at batch size 2 equals batch size 1.

Run: .venv/bin/python -m pytest -q tests/unit/export/test_hf_padding.py
"""

from __future__ import annotations

import pytest
import torch

from softmoe.model import ModelConfig
from softmoe.export.checkpoint import hf_tokenizer
from softmoe.export.hf import SoftMoEConfig, SoftMoEForCausalLM

VOCAB = 50
LENGTHS = [7, 3, 5]


def tiny(router: str, vocab_size: int = VOCAB, max_seq_len: int = 32) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4,
                       d_expert=16, k=1.5 if router == "softmoe" else 2, router=router, max_seq_len=max_seq_len)


@pytest.fixture(scope="module", params=["softmoe", "topk"])
def model(request) -> SoftMoEForCausalLM:
    torch.manual_seed(0)
    return SoftMoEForCausalLM(SoftMoEConfig.from_model_config(tiny(request.param))).eval()


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (B, max length), with every row's tokens at the right end."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


@pytest.fixture(scope="module")
def rows() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randint(1, VOCAB, (n,)) for n in LENGTHS]


def test_left_padded_logits_equal_unpadded_rows(model, rows):
    ids, mask = left_padded(rows)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        assert torch.isfinite(padded).all()  # padding slots included: nothing NaN anywhere
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(padded[i, -len(row):], alone, atol=1e-5, rtol=1e-5)


def test_padding_is_not_routed(model, rows):
    """One left-padded row: every MoE layer's statistics (real tokens only) equal the unpadded row's."""
    row = rows[1]
    ids = torch.cat([torch.zeros(4, dtype=torch.long), row])[None]
    mask = torch.cat([torch.zeros(4), torch.ones(len(row))])[None]  # float 0/1 is accepted too
    with torch.no_grad():
        padded = model.model(ids, attention_mask=mask)
        alone = model.model(row[None])
    torch.testing.assert_close(padded.logits[0, -len(row):], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss, atol=1e-6, rtol=1e-5)
    assert padded.routing.keys() == alone.routing.keys()
    for block, stats in alone.routing.items():
        for name, want in stats.items():
            torch.testing.assert_close(padded.routing[block][name], want, atol=1e-5, rtol=1e-5,
                                       msg=f"block {block} {name}")


def test_all_ones_mask_is_the_unmasked_path(model, rows):
    ids = torch.stack([rows[0], rows[0].flip(0)])
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, plain)
        # GPT's masked path (an explicit all-True mask) agrees with its unmasked path to round-off.
        masked = model.model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_left_padded_greedy_generate_equals_each_row_alone(model, rows):
    ids, mask = left_padded(rows)
    new = 8
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (len(rows), ids.shape[1] + new)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(row):]), f"row {i}"


def test_left_padded_cached_decoding_matches_a_full_forward(model, rows):
    """GPT's own KV cache with a growing pad mask == one uncached forward over the whole padded batch."""
    ids, mask = left_padded(rows)
    steps = torch.randint(1, VOCAB, (len(rows), 3))
    full_ids = torch.cat([ids, steps], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], dim=1)
    cache = model.model.new_cache(len(rows))
    with torch.no_grad():
        want = model.model(full_ids, attention_mask=full_mask).logits
        got = [model.model(ids, cache=cache, attention_mask=mask).logits]
        for t in range(steps.shape[1]):
            got.append(model.model(steps[:, t:t + 1], cache=cache,
                                   attention_mask=full_mask[:, :ids.shape[1] + t + 1]).logits)
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(got, dim=1)[real], want[real], atol=1e-5, rtol=1e-5)


def test_left_padded_sampling_with_a_seed(model, rows):
    ids, mask = left_padded(rows)

    def sample():
        torch.manual_seed(3)
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=True,
                              top_p=0.9, temperature=0.8)

    first = sample()
    assert first.shape == (len(rows), ids.shape[1] + 6) and int(first.max()) < VOCAB
    assert torch.equal(first[:, :ids.shape[1]], ids)
    assert torch.equal(sample(), first)


def test_holes_and_bad_masks_are_refused(model, rows):
    ids = torch.randint(1, VOCAB, (2, 5))
    hole = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"attention_mask row 1 has a 0 between 1s \(a hole, first at slot 2\)"):
        model(ids, attention_mask=hole)
    with pytest.raises(ValueError, match="attention_mask row 1 has a 0 between 1s"):
        model.model(ids, attention_mask=hole)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\).*\(2, 5\)"):
        model(ids, attention_mask=hole[:, :4])
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=hole * 2)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None].expand(2, 5))
    # Right padding scores fine without generation, but generate's appended tokens would open a hole.
    right = hole.clone()
    right[1] = torch.tensor([1, 1, 1, 0, 0])
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=right, use_cache=True).logits).all()
    with pytest.raises(ValueError, match="attention_mask row 1 has a 0 between 1s.*pad them on the left"):
        model.generate(ids, attention_mask=right, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("router", ["softmoe"])
def test_hflm_generate_until_batched_equals_one_at_a_time(router, tmp_path):
    """lm-eval's HFLM left-pads generate_until batches; batch size 2 must give batch size 1's strings."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the dev extra: pip install -e '.[dev]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from softmoe.data.tokenizer import train_bpe

    contexts = ["Question: Which of these is a metal?\nAnswer:", "Q: Sky?\nA:",
                "Question: What do plants need to make food in the sunlight?\nAnswer:"]
    train_bpe(contexts * 4, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    tok = hf_tokenizer(tmp_path / "tokenizer.json")
    assert len({len(tok(c).input_ids) for c in contexts}) == 3  # different lengths, so batches get padded
    torch.manual_seed(0)
    model = SoftMoEForCausalLM(SoftMoEConfig.from_model_config(tiny(router, 300, 64))).eval()
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    instances = [Instance("generate_until", doc={}, arguments=(c, dict(gen_kwargs)), idx=i)
                 for i, c in enumerate(contexts)]
    outputs = {}
    for batch_size in (1, 2):
        lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
        outputs[batch_size] = lm.generate_until(instances, disable_tqdm=True)
    assert len(outputs[2]) == 3 and all(isinstance(s, str) for s in outputs[2])
    assert outputs[2] == outputs[1]
