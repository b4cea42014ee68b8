"""`python -m coe_dist.train ...` = `coe-dist train ...` (the form torchrun and mpirun launch)."""

import sys

from coe_dist.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
