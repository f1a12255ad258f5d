"""Tokenizers: byte-level BPE round trip, PTB word vocabulary, training-text hash.

Run: .venv/bin/python -m pytest tests/unit/data/test_tokenizer.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from softmoe.data.tokenizer import EOS, EOT, build_word_level, encode_documents, text_sha256, train_bpe

TEXTS = ["Call me Ishmael. Some years ago, never mind how long precisely.",
         "In the beginning God created the heaven and the earth.",
         "Fellow-Citizens of the Senate and House of Representatives: the year 1790."] * 5


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, vocab_size=300)


@pytest.mark.parametrize(
    "text", ["Call me Ishmael.", "  two  spaces\n\nand lines\t", "naïve café — “quotes” 日本 🐋", ""]
)
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text).ids) == text


def test_bpe_layout(bpe):
    assert bpe.token_to_id(EOT) == 0
    assert bpe.get_vocab_size() <= 300
    assert all(i < 300 for i in bpe.encode("zzz unseen ZZZ").ids)


def test_bpe_training_is_deterministic(bpe):
    assert train_bpe(TEXTS, vocab_size=300).to_str() == bpe.to_str()


def test_bpe_rejects_bad_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(TEXTS, vocab_size=100)


def test_encode_documents_appends_separator(bpe):
    tokens = encode_documents(bpe, ["ab", "cd"], sep_id=0)
    assert tokens.dtype == np.uint16 and (tokens == 0).sum() == 2 and tokens[-1] == 0
    assert bpe.decode(tokens.tolist(), skip_special_tokens=False) == f"ab{EOT}cd{EOT}"


def test_word_level_vocab_and_unk():
    tok = build_word_level([" the cat sat the ", " the dog <unk> ", ""])
    vocab = tok.get_vocab()
    assert set(vocab) == {"the", "cat", "sat", "dog", "<unk>", EOS}
    assert vocab["the"] == 0 and vocab[EOS] == 1  # by descending frequency
    assert tok.encode("the zebra").ids == [0, vocab["<unk>"]]


def test_text_sha256_separates_documents():
    assert text_sha256(["ab", "c"]) != text_sha256(["a", "bc"])
    assert text_sha256(["ab", "c"]) == text_sha256(iter(["ab", "c"]))
