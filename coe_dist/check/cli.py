"""`coe-dist check`: the command line of the preflight (runner.py does the work on every rank).

    coe-dist check --config CFG [--set K=V ...] [--nproc P] [--items gemm,a2a] [--profile NAME] [--steps S]
    torchrun --nproc-per-node 8 ... -m coe_dist.check --config CFG       # one rank of a launched job
    coe-dist slurm submit --check --config CFG --nodes N --procs-per-node P   # the same as a Slurm job
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from coe_dist.cli_common import add_config_args, parse_and_run, spawn_torchrun, under_launcher
from coe_dist.config import check_world, load_config

SPAWNED = "COE_DIST_CHECK_SPAWNED"  # set for the ranks `--nproc` starts: the parent reports the exit code


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="start this many local ranks through torchrun (default 1; "
                                                        "under torchrun/srun/mpirun every rank runs the check)")
    p.add_argument("--items", help="comma-separated subset of versions,kernels,disk,gemm,a2a,layer,train,cost "
                                   "(default all)")
    p.add_argument("--profile", help="profile YAML or name in configs/profiles/ to compare with (default: the "
                                     "one matching the device: cpu-local, h100-nvlink-ib400, h200-nvlink-ib400)")
    p.add_argument("--steps", type=int, default=3, help="training steps of the train item (>= 2, default 3)")
    p.add_argument("--out", help="scratch directory and check.json (default <log.run_dir>/check)")
    p.add_argument("--json", help="write the verdicts here instead of <out>/check.json")


def register_cli(sub) -> None:
    """Add `check` to the top-level `coe-dist` subparsers."""
    p = sub.add_parser(
        "check", help="preflight: versions, GEMM and all-to-all speed, the CoE layer, training and checkpoints, "
                      "disk, predicted step time (first step on a new cluster)",
        description="Check this machine (or every rank of a launched job) for a run config: one PASS/WARN/FAIL "
                    "line per item, exit 1 if any item fails. Items: versions, kernels, disk, gemm, a2a, layer, "
                    "train, cost (docs/launching.md).")
    _add_arguments(p)
    p.set_defaults(func=_check)


def _argv(args: argparse.Namespace) -> list[str]:
    """The check's arguments of a parsed command line, for every rank torchrun starts."""
    argv = ["--config", args.config] if args.config else []
    for override in args.overrides:
        argv += ["--set", override]
    for name in ("items", "profile", "out", "json"):
        if getattr(args, name):
            argv += [f"--{name}", getattr(args, name)]
    argv += ["--steps", str(args.steps)]
    if getattr(args, "debug", False):
        argv.append("--debug")
    return argv


def _check(args: argparse.Namespace) -> int:
    from coe_dist.check import runner
    from coe_dist.config import ConfigError

    cfg = load_config(args.config, args.overrides)
    items = runner.parse_items(args.items)
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: the train item needs >= 2 (a checkpoint before the last step)")
    out_dir = Path(args.out) if args.out else Path(cfg.log.run_dir) / "check"
    json_path = Path(args.json) if args.json else out_dir / "check.json"
    if args.nproc > 1 and not under_launcher():
        check_world(cfg, args.nproc)  # fail before starting any process
        json_path.unlink(missing_ok=True)
        rc = spawn_torchrun(args.nproc, ["coe_dist.check", *_argv(args)], env={SPAWNED: "1"})
        # The ranks exit 0 after a failed item (torchrun would add its own traceback); the verdicts say.
        if rc == 0 and json_path.is_file():
            return 1 if json.loads(json_path.read_text())["failed"] else 0
        return rc or 1
    rc = runner.run(cfg, items=items, profile=args.profile, out_dir=out_dir, steps=args.steps, json_path=json_path)
    if under_launcher():
        runner.finish(0 if os.environ.get(SPAWNED) == "1" else rc)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coe-dist check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    _add_arguments(parser)
    parser.set_defaults(func=_check)
    return parse_and_run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
