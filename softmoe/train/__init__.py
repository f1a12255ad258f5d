"""Training: config and presets, optimizer, schedule, the loop, checkpoints and metrics.

    config.py      TrainConfig, RunConfig (model + data + train), YAML loader with key=value overrides
    optim.py       AdamW parameter groups (decay on matrices only; budget/alpha at their own lr)
    schedule.py    linear warmup + cosine, a pure function of the step
    data.py        the loop's view of softmoe.data: train/val batches by index, tokenizer files
    loop.py        Trainer (step, eval, checkpoint, exact resume) and evaluate
    controllers.py after-step updates of routing state: ReMoE's L1 coefficient, the loss-free bias
    checkpoint.py  atomic safetensors checkpoints with a sha256 manifest; fallback to the last good one
    metrics.py     metrics.jsonl + TensorBoard, routing summaries
    restore.py     rebuild a trained model (and tokenizer) from a checkpoint
    __main__.py    `python -m softmoe.train` (= `softmoe train`, softmoe/cli/train.py), what torchrun launches

Nothing is imported here, so `softmoe --help` stays fast; import the submodules directly.
"""
