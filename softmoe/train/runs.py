"""Finished-or-resume training, shared by the main job and the comparison study.

A run directory is *finished* when its summary.json records the configured final step and its
saved config.yaml equals the config asked for; such a run is reused as it is. Anything else
(missing, interrupted, or trained with other settings) goes through `Trainer.fit(resume=True)`,
which continues from the newest good checkpoint when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from softmoe.data import DataConfig, dataset_dir_for, prepare
from softmoe.train.config import RunConfig, same_config
from softmoe.train.loop import Trainer

__all__ = ["is_finished", "prepared_dataset_dir", "train_or_reuse"]


def prepared_dataset_dir(data: DataConfig) -> Path:
    """The config's dataset, fetched and prepared if needed (the only step that may use the network)."""
    if data.corpus == "tiny":
        return dataset_dir_for(data)
    return prepare(data.corpus, data.data_dir, tokenizer=data.tokenizer, vocab_size=data.vocab_size,
                   split_seed=data.split_seed)


def is_finished(config: RunConfig) -> bool:
    """Whether `config`'s run directory holds a run trained to the end with exactly this config."""
    run_dir = config.train.run_dir
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    if json.loads(summary.read_text()).get("step") != config.train.steps:
        return False
    return same_config(yaml.safe_load(saved.read_text()), config)



def train_or_reuse(config: RunConfig) -> Path:
    """Run directory of a finished training run: trains (or resumes) unless it already finished."""
    run_dir = config.train.run_dir
    if is_finished(config):
        print(f"{run_dir}: already trained to step {config.train.steps}; reusing it", flush=True)
        return run_dir
    Trainer(config).fit(resume=True)
    return run_dir
