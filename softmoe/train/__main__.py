"""`python -m softmoe.train ...` = `softmoe train ...`: the entry point torchrun launches.

    torchrun --standalone --nproc_per_node=2 -m softmoe.train --config configs/tiny/softmoe.yaml parallel.data=ddp
"""

import sys

from softmoe.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
