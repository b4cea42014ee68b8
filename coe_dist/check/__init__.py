"""`coe-dist check`: a preflight of a cluster (or this machine) for one run config, before a long run.

    runner.py    join the job, run the items in order, verdict lines, JSON, exit code
    versions.py  versions, kernels      what every rank runs (and whether all ranks agree)
    disk.py      disk                   write permission and free space for log.keep_last checkpoints
    speed.py     gemm, a2a              expert GEMM rate, all-to-all latency and bandwidth vs the profile
    layer.py     layer                  the CoE layer on the device vs float64 on CPU
    training.py  train                  a few steps, checkpoint, resume, bitwise comparison
    cost.py      cost                   the cost model's step time and all-to-all share on this machine
    cli.py       `coe-dist check`, its torchrun launch
"""
