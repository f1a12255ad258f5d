"""The tiny fixture dataset: same layout as a prepared corpus, fast, offline; DataConfig validation.

Run: .venv/bin/python -m pytest tests/unit/data/test_fixtures.py -q
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from softmoe.data import DataConfig, WindowLoader, dataset_dir_for, load_split, read_meta
from softmoe.data.fixtures import TINY_VOCAB, make_tiny_dataset
from softmoe.data.io import sha256_file
from softmoe.data.tokenizer import load_tokenizer, load_tokenizer_meta

LAYOUT = {"meta.json", "splits.json", "tokenizer.json", "tokenizer_meta.json",
          "train.bin", "val.bin", "test.bin"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    start = time.perf_counter()
    path = make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")
    assert time.perf_counter() - start < 2.0
    return path


def test_layout_and_meta(tiny):
    assert {p.name for p in tiny.iterdir()} == LAYOUT
    meta = read_meta(tiny)
    assert meta["corpus"] == "tiny" and meta["dtype"] == "uint16" and meta["vocab_size"] <= TINY_VOCAB
    for split in ("train", "val", "test"):
        info = meta["splits"][split]
        assert info["documents"] >= 1 and info["tokens"] > 0
        assert sha256_file(tiny / f"{split}.bin") == info["sha256"]
        tokens = load_split(tiny, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.shape == (info["tokens"],)
        assert tokens[-1] == meta["sep_id"] and int(tokens.max()) < meta["vocab_size"]
    assert meta["splits"]["train"]["tokens"] >= 4000  # room for the tiny preset's windows


def test_tokenizer_round_trip_and_hash(tiny):
    tok = load_tokenizer(tiny)
    assert tok.get_vocab_size() == read_meta(tiny)["vocab_size"]
    text = "Four score and seven years ago, the old miller carried a lantern."
    assert tok.decode(tok.encode(text).ids) == text
    assert len(load_tokenizer_meta(tiny)["train_text_sha256"]) == 64
    first_doc = load_split(tiny, "train")[:20].tolist()
    assert tok.decode(first_doc)  # decodes to text


def test_tampered_tokenizer_is_detected(tmp_path):
    path = make_tiny_dataset(tmp_path / "t")
    (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(path)


def test_deterministic_and_idempotent(tiny, tmp_path):
    other = make_tiny_dataset(tmp_path / "tiny")
    for name in LAYOUT:
        assert (other / name).read_bytes() == (tiny / name).read_bytes(), name
    mtime = (other / "meta.json").stat().st_mtime_ns
    assert make_tiny_dataset(other) == other and (other / "meta.json").stat().st_mtime_ns == mtime
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not leftovers  # no temp or old directories left behind


def test_concurrent_builders_take_turns(tmp_path):
    out = tmp_path / "tiny"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: make_tiny_dataset(out), range(4)))
    assert results == [out] * 4
    assert read_meta(out)["splits"]["train"]["sha256"] == sha256_file(out / "train.bin")


def test_loader_on_fixture(tiny):
    loader = WindowLoader(load_split(tiny, "train"), seq_len=64, batch_size=8, seed=0)
    idx_BT, targets_BT = loader.batch(0)
    assert idx_BT.shape == (8, 64) and int(idx_BT.max()) < read_meta(tiny)["vocab_size"]


def test_load_split_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="split='dev'"):
        load_split(tiny, "dev")
    with pytest.raises(FileNotFoundError, match="softmoe data fetch"):
        load_split(tmp_path, "train")


def test_dataset_dir_for_tiny_needs_no_network(tmp_path):
    cfg = DataConfig(corpus="tiny", data_dir=str(tmp_path), seq_len=32, batch_size=2)
    path = dataset_dir_for(cfg)
    assert path == tmp_path / "tiny" and (path / "meta.json").is_file()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"corpus": "web"}, "corpus='web'"), ({"seq_len": 0}, "seq_len=0"),
    ({"seed": -1}, "seed=-1"), ({"tokenizer": "char"}, "tokenizer='char'"),
    ({"tokenizer": "word", "corpus": "prose"}, "tokenizer='word'"), ({"vocab_size": 100}, "vocab_size=100"),
])
def test_data_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "field"), [({"batch_size": 1.5}, "batch_size=1.5"), ({"seed": "0"}, "seed='0'")])
def test_data_config_wrong_types_are_type_errors(kwargs, field):
    with pytest.raises(TypeError, match=field):
        DataConfig(**kwargs)


def test_data_config_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTMOE_DATA_DIR", str(tmp_path))
    assert DataConfig().resolved_data_dir == tmp_path
    assert DataConfig(data_dir="/elsewhere").resolved_data_dir.as_posix() == "/elsewhere"
