"""Finished-or-resume training, shared by the main job and the comparison study.

A run directory is *finished* when its summary.json records the configured final step and its
saved config.yaml trains what the config asked for (train/rundir.py's trajectory settings); such a run is reused as it is. Anything else
(missing or interrupted) goes through `Trainer.fit(resume="auto")`, which continues from the newest good
checkpoint when there is one; a run directory holding another config is refused (train/rundir.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from softmoe.data import DataConfig, dataset_dir_for, prepare
from softmoe.train.config import RunConfig
from softmoe.train.loop import Trainer
from softmoe.train.rundir import trajectory_diff

__all__ = ["is_finished", "prepared_dataset_dir", "train_or_reuse"]


def prepared_dataset_dir(data: DataConfig, progress: bool = False) -> Path:
    """The config's dataset, fetched and prepared if needed (the only step that may use the network)."""
    if data.corpus == "tiny":
        return dataset_dir_for(data)
    return prepare(data.corpus, data.data_dir, tokenizer=data.tokenizer, vocab_size=data.vocab_size,
                   split_seed=data.split_seed, progress=progress)


def is_finished(config: RunConfig) -> bool:
    """Whether `config`'s run directory holds a run trained to the end with exactly this config."""
    run_dir = config.train.run_dir
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    try:
        if json.loads(summary.read_text()).get("step") != config.train.steps:
            return False
        return not trajectory_diff(yaml.safe_load(saved.read_text()), config)
    except (yaml.YAMLError, ValueError, TypeError):
        return False


def train_or_reuse(config: RunConfig) -> Path:
    """Run directory of a finished training run: trains (or resumes) unless it already finished."""
    run_dir = config.train.run_dir
    if is_finished(config):
        print(f"{run_dir}: already trained to step {config.train.steps}; reusing it", flush=True)
        return run_dir
    result = Trainer(config).fit(resume="auto")
    if result.interrupted:
        raise KeyboardInterrupt
    return run_dir
