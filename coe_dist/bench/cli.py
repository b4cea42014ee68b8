"""`coe-dist bench`: scaling studies of the expert-parallel communication.

    coe-dist bench comm --grid configs/bench/ci.yaml --out runs/bench/ci          # under torchrun/srun/mpirun
    coe-dist bench comm --nproc 2 --iterations 1,2,4 --total-k 4 --ep-size 2       # starts torchrun itself
    coe-dist bench comm --nproc 2 --grid configs/bench/dispatch.yaml --dispatch copies,dedup --dispatch-dtype fp8
    coe-dist bench comm --nproc 2 --grid configs/bench/calibrate.yaml --calibrate --profile-out PROFILE.yaml
    coe-dist bench project --profile h100-nvlink-ib400 --gpus 8,64,512,4096 --model configs/paper/coe-2-4of64.yaml

Also runnable without the top-level CLI: `python -m coe_dist.bench.cli comm ...` (what --nproc launches).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

from coe_dist.argtypes import OneLineParser, nonnegative_int, positive_float, positive_int
from coe_dist.cli_common import parse_and_run, spawn_torchrun, under_launcher

GRID_OPTIONS = (
    ("iterations", "C: CoE iterations"), ("top_k", "K: experts per token per iteration"),
    ("total_k", "C*K held fixed: K = total_k / C (overrides --top-k)"), ("num_experts", "N: routed experts"),
    ("hidden", "d: hidden size"), ("expert_hidden", "f: expert width"), ("tokens", "T: tokens per rank"),
    ("dtype", "bf16 | fp32 (wire and expert compute)"), ("ep_size", "P: expert-parallel group size"),
    ("routing", "learned-random | forced-balanced | skewed"), ("zipf", "Zipf exponent for --routing skewed"),
    ("num_shared_experts", "S: shared experts"), ("layers", "L: CoE layers per step"),
    ("dispatch", "copies | dedup: a row per token copy, or per token and destination rank (moe.dispatch)"),
    ("dispatch_dtype", "bf16 | fp8: forward dispatch rows in the compute dtype, or e4m3 + a float32 scale "
                       "per row (moe.dispatch_dtype)"),
)


def _add_comm(sub) -> None:
    p = sub.add_parser(
        "comm", help="measure every phase of expert-parallel CoE layers over a grid (run on every rank)",
        description="Sweep a grid of CoE layer shapes and measure, per layer and iteration, routing, permute, "
                    "count exchange, dispatch all-to-all, expert compute, combine all-to-all, unpermute and "
                    "the backward of each, with bytes per rank. Run it on every rank (torchrun, srun, mpirun) "
                    "or pass --nproc to start torchrun on this node. Grid values are comma-separated lists; "
                    "every combination is a case.")
    p.add_argument("--grid", help="YAML with `grid:` (key: list), optional `cases:` and `bench:` "
                                  "(warmup, repeats, calibrate); see configs/bench/")
    g = p.add_argument_group("grid (override the YAML's values; comma-separated lists)")
    for key, text in GRID_OPTIONS:
        g.add_argument(f"--{key.replace('_', '-')}", dest=f"grid_{key}", metavar="V[,V...]", help=text)
    p.add_argument("--warmup", type=nonnegative_int, help="untimed rounds first (default: YAML bench.warmup or 2)")
    p.add_argument("--repeats", type=positive_int, help="timed rounds (default: YAML bench.repeats or 10)")
    p.add_argument("--out", help="run directory for CSV/JSON/TensorBoard/plots (default runs/bench/comm-DATE)")
    p.add_argument("--report", nargs="?", const="", metavar="PATH",
                   help="also write a markdown report (default <out>/report.md, or PATH, e.g. docs/bench.md)")
    p.add_argument("--calibrate", action="store_true",
                   help="also run all-to-all and GEMM microbenchmarks and write a cluster profile YAML")
    p.add_argument("--profile-out", metavar="PATH", help="where --calibrate writes the profile "
                                                         "(default <out>/profile.yaml)")
    p.add_argument("--profile-name", help="name stored in the calibrated profile (default <host>-measured)")
    p.add_argument("--nproc", type=positive_int, help="start this many local ranks through torchrun")
    p.add_argument("--backend", default="auto", help="auto (nccl on GPU, gloo on CPU) | nccl | gloo")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads per rank on CPU (default cores / ranks per node)")
    p.add_argument("--timeout-s", type=positive_float, default=300.0, help="collective timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_comm)


def _add_project(sub) -> None:
    p = sub.add_parser(
        "project", help="predict step time and exposed communication of a model config on a cluster profile",
        description="Predict step time, exposed all-to-all share and tokens/s of a CoE config and its "
                    "equal-FLOP MoE (C=1, (K+S)*C - S routed experts) at several GPU counts, from a cluster "
                    "profile (configs/profiles/ or `bench comm --calibrate`). Prints a table, writes CSV/JSON "
                    "and a plot.")
    p.add_argument("--profile", required=True, help="profile YAML or name in configs/profiles/")
    p.add_argument("--gpus", default="8,64,512,4096", help="comma-separated GPU (rank) counts")
    p.add_argument("--model", required=True, help="run config of the CoE model, e.g. configs/paper/coe-2-4of64.yaml")
    p.add_argument("--moe-model", help="run config of the MoE to compare (default: derived equal-FLOP MoE)")
    p.add_argument("--ep-size", default="max",
                   help="expert-parallel size per GPU count: max (= min(GPUs, N)), node (= GPUs per node) or "
                        "a number (capped at the GPU count)")
    p.add_argument("--tokens-per-gpu", type=positive_int, help="T per GPU (default micro_batch_size * seq_len)")
    p.add_argument("--out", help="directory for projection.csv/json/png (default runs/bench/project-PROFILE)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=_project)


def register_cli(sub) -> None:
    """Add `bench` (subcommands comm, project) to the top-level `coe-dist` subparsers."""
    p = sub.add_parser("bench", help="communication scaling studies: measure (comm), project (project)",
                       description="Measure and model the communication cost of expert-parallel CoE layers.")
    bench = p.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    _add_comm(bench)
    _add_project(bench)


def _grid_overrides(args: argparse.Namespace) -> dict:
    return {key: getattr(args, f"grid_{key}") for key, _ in GRID_OPTIONS
            if getattr(args, f"grid_{key}", None) is not None}


def _comm(args: argparse.Namespace) -> int:
    if not args.out:
        args.out = f"runs/bench/comm-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    if args.nproc and args.nproc > 1 and not under_launcher():
        return _spawn(args)
    from coe_dist.bench import comm

    args.grid_overrides = _grid_overrides(args)
    rc = comm.run(args)
    if under_launcher():
        # Everything is written and the process group is gone. Leave without running static destructors:
        # after gloo groups have carried all-to-alls, about one exit in three aborts in them ("terminate
        # called without an active exception", no Python frame), which the launcher reports as a failure
        # (seen here and in benchmarks/ep_layer.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def comm_argv(args: argparse.Namespace) -> list[str]:
    """The `comm` arguments of a parsed command line, for re-running it on every rank."""
    argv: list[str] = []
    if args.grid:
        argv += ["--grid", args.grid]
    for key, _ in GRID_OPTIONS:
        value = getattr(args, f"grid_{key}", None)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    for name in ("warmup", "repeats", "out", "profile_out", "profile_name", "threads"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if args.report is not None:
        argv += ["--report", args.report] if args.report else ["--report"]
    if args.calibrate:
        argv.append("--calibrate")
    argv += ["--backend", args.backend, "--device", args.device, "--timeout-s", str(args.timeout_s),
             "--seed", str(args.seed)]
    return argv


def _spawn(args: argparse.Namespace) -> int:
    """Re-run this command as --nproc local ranks under torchrun's agent (one PID, signals passed on)."""
    debug = getattr(args, "debug", False)
    return spawn_torchrun(args.nproc, ["coe_dist.bench.cli", *(["--debug"] if debug else []), "comm",
                                       *comm_argv(args)], debug=debug)


def _project(args: argparse.Namespace) -> int:
    from coe_dist.bench import project

    return project.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="coe-dist bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    _add_comm(sub)
    _add_project(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m coe_dist.bench.cli comm|project ...` with the top-level CLI's error handling."""
    return parse_and_run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
