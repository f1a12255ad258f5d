"""A tiny dataset in the exact layout of a prepared corpus, built offline in well under a second.

The text is the Gettysburg Address (public domain) plus short documents generated from a small
grammar with a fixed seed, so tests and the `tiny` preset have real-looking, learnable English
without the network. The pipeline is the real one (document split, byte-level BPE trained on
train, `write_dataset`), only smaller.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from softmoe.data.corpora import split_documents
from softmoe.data.extract import Document
from softmoe.data.io import atomic_write_json, build_lock, sha256_bytes
from softmoe.data.layout import FORMAT_VERSION, build_atomically, is_prepared, write_dataset
from softmoe.data.tokenizer import EOT, train_bpe

__all__ = ["TINY_VOCAB", "make_tiny_dataset", "tiny_documents"]

TINY_VOCAB = 384
FIXTURE_VERSION = 1

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived "
    "and so dedicated, can long endure. We are met on a great battle-field of that war. We have come "
    "to dedicate a portion of that field, as a final resting place for those who here gave their "
    "lives that that nation might live. It is altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- "
    "this ground. The brave men, living and dead, who struggled here, have consecrated it, far above "
    "our poor power to add or detract. The world will little note, nor long remember what we say "
    "here, but it can never forget what they did here. It is for us the living, rather, to be "
    "dedicated here to the unfinished work which they who fought here have thus far so nobly "
    "advanced. It is rather for us to be here dedicated to the great task remaining before us -- that "
    "from these honored dead we take increased devotion to that cause for which they gave the last "
    "full measure of devotion -- that we here highly resolve that these dead shall not have died in "
    "vain -- that this nation, under God, shall have a new birth of freedom -- and that government of "
    "the people, by the people, for the people, shall not perish from the earth."
)

# A small grammar for the generated stories: enough variety that a tiny model has something to learn.
_SUBJECTS = [
    "the old miller", "a young sailor", "the captain", "my sister", "the farmer's wife", "a tired horse",
    "the village priest", "an honest clerk", "the blacksmith", "a small boy", "the widow", "the judge",
]
_VERBS = [
    "carried", "found", "watched", "mended", "sold", "painted", "lost", "remembered", "followed", "buried",
]
_OBJECTS = [
    "a lantern", "the broken wheel", "a letter from home", "the red boat", "a loaf of bread",
    "the silver key", "an old map", "the heavy nets", "a basket of apples", "the church bell",
]
_PLACES = [
    "by the river", "in the market", "on the hill", "near the mill", "at the harbour", "under the bridge",
    "in the cold barn", "along the shore",
]
_TIMES = [
    "at dawn", "before the storm", "in the spring", "late at night", "after the harvest", "on Sunday",
]
_CODAS = [
    "and nobody said a word.", "while the dogs barked.", "because the winter was long.",
    "as the rain began to fall.", "and then went home.", "though it was far too late.",
]


def _sentence(rng: random.Random) -> str:
    words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
    if rng.random() < 0.5:
        words += f" {rng.choice(_TIMES)}"
    ending = f", {rng.choice(_CODAS)}" if rng.random() < 0.4 else "."
    return words[0].upper() + words[1:] + ending


def tiny_documents(num_docs: int = 48, seed: int = 0) -> list[Document]:
    """The fixture's documents: the Gettysburg Address plus `num_docs` generated ones (~500 chars each)."""
    rng = random.Random(seed)  # random.Random(int) streams are stable across Python versions
    docs = [Document("tiny", "tiny/gettysburg", GETTYSBURG)]
    for i in range(num_docs):
        paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
                      for _ in range(rng.randint(1, 3))]
        docs.append(Document("tiny", f"tiny/story_{i:03d}", "\n\n".join(paragraphs)))
    return docs


def make_tiny_dataset(
    out_dir: Path, *, vocab_size: int = TINY_VOCAB, num_docs: int = 48, seed: int = 0
) -> Path:
    """Build (or reuse) the tiny dataset at `out_dir`, same layout as `prepare`; returns `out_dir`.

    Args:
        out_dir: dataset directory to create (its parent is created if needed).
        vocab_size: BPE vocabulary, in [258, 65536].
        num_docs: generated documents besides the Gettysburg Address.
        seed: grammar seed (the split uses seed 0, val/test 10% each).
    """
    if not isinstance(num_docs, int) or num_docs < 8:
        raise ValueError(f"num_docs={num_docs!r} must be an int >= 8 (val and test need documents)")
    out_dir = Path(out_dir)
    recipe = {"fixture": FIXTURE_VERSION, "format": FORMAT_VERSION, "vocab_size": vocab_size,
              "num_docs": num_docs, "seed": seed}
    recipe_sha = sha256_bytes(json.dumps(recipe, sort_keys=True).encode())
    if is_prepared(out_dir, recipe_sha):
        return out_dir
    with build_lock(out_dir):
        if not is_prepared(out_dir, recipe_sha):  # another process may have just built it
            _build(out_dir, vocab_size, num_docs, seed, recipe_sha)
    return out_dir


def _build(out_dir: Path, vocab_size: int, num_docs: int, seed: int, recipe_sha: str) -> None:
    parts = split_documents(tiny_documents(num_docs, seed), val_frac=0.1, test_frac=0.1, seed=0)
    texts = {s: [d.text for d in docs] for s, docs in parts.items()}
    tok = train_bpe(texts["train"], vocab_size)
    extra = {"format": FORMAT_VERSION, "name": out_dir.name, "corpus": "tiny", "unit": "bpe",
             "sources": [{"name": "tiny", "version": FIXTURE_VERSION, "licence": "public domain"}],
             "split": {"method": "sha256-rank-by-source", "seed": 0, "val_frac": 0.1, "test_frac": 0.1},
             "recipe_sha256": recipe_sha}

    def fill(tmp_dir: Path) -> None:
        atomic_write_json(tmp_dir / "splits.json", {s: [d.doc_id for d in p] for s, p in parts.items()})
        write_dataset(tmp_dir, tok, "bpe", EOT, texts, extra)

    build_atomically(out_dir, fill)
