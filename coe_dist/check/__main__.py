"""`python -m coe_dist.check ...` = `coe-dist check ...` (what --nproc starts under torchrun)."""

import sys

from coe_dist.check.cli import main

sys.exit(main())
