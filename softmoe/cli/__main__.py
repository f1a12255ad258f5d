"""`python -m softmoe.cli ...` = `softmoe ...`."""

import sys

from softmoe.cli.app import main

sys.exit(main())
