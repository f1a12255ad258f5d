"""`python -m softmoe.train ...` = `softmoe train ...`: the entry point torchrun launches.

    torchrun --standalone --nproc_per_node=2 -m softmoe.train --config configs/tiny/softmoe.yaml parallel.data=ddp

A front end that `python -m` must find in softmoe/train/: it belongs to the cli stage (nothing imports it; the
import-graph test checks both).
"""

import os
import sys

if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker; set before torch is imported, which reads it once
    # DDP's find_unused_parameters=True is deliberate (softmoe/parallel/wrap.py), and its C++ warning that none were
    # found would repeat on every rank: C++ warnings of the workers are hidden unless the user sets the level.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from softmoe.cli.app import main  # noqa: E402  (imports no torch)

sys.exit(main(["train", *sys.argv[1:]]))
