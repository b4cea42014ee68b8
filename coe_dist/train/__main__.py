"""`python -m coe_dist.train ...` = `coe-dist train ...` (the form torchrun, mpirun and srun launch)."""

import logging
import os
import sys

from coe_dist.cli import main

try:
    code = main(["train", *sys.argv[1:]])
except SystemExit as e:  # the loop stopped on a signal (exit 128 + signal): leave the same way as below
    code = e.code if isinstance(e.code, int) else 1
# Leave without interpreter teardown: destroying gloo process groups created through DeepSpeed's groups
# aborts the process now and then ("terminate called without an active exception"), which would turn a
# finished run into a failed one. Everything the run writes is closed or flushed by now.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
mpi = sys.modules.get("mpi4py.MPI")
if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
    mpi.Finalize()  # mpirun counts a rank that exits without MPI_Finalize as an abnormal termination
os._exit(code)
