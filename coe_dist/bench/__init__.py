"""Scaling studies of the expert-parallel communication (`coe-dist bench`, issue 6).

    grid.py      cases, grids, routing tables, analytic byte counts
    layer.py     one CoE layer taken apart into timed phases (forward and backward)
    timing.py    CPU / CUDA phase timers and the barrier between phases
    comm.py      `bench comm`: run a grid on every rank, --calibrate microbenchmarks and profile
    outputs.py   CSV / JSON / TensorBoard outputs and their aggregation
    machine.py   CPU model and load average, recorded with every measurement (also by benchmarks/)
    plots.py     PNG plots; report.py: markdown pages
    model.py     the cost model, cluster profiles and fitting
    project.py   `bench project`: CoE vs equal-FLOP MoE on a cluster profile
    validate.py  fit on part of the local measurements, predict the rest
    scaling_doc.py  docs/scaling.md from the committed runs
    cli.py       register_cli(subparsers) for the top-level `coe-dist`
"""
