"""`coe-dist`: the command line.

    coe-dist train --config configs/tiny.yaml [--set section.key=value ...] [--nproc P]
    coe-dist preprocess --input FILES --tokenizer TOKENIZER --output PREFIX [--fields question,answer]
    coe-dist eval --checkpoint RUN_OR_CHECKPOINT_DIR
    coe-dist generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt TEXT
    coe-dist convert export --checkpoint RUN_OR_CHECKPOINT_DIR --output DIR [--format hf|reference]
    coe-dist convert import --from-hf DIR --iterations C --output RUN_DIR | --from-reference DIR --output RUN_DIR
    coe-dist convert import --from-checkpoint MOE_RUN --iterations C --top-k K --output RUN_DIR
    coe-dist placement plan --checkpoint RUN [--ep-size P]    then  train ... --set moe.placement=PLAN
    coe-dist train --config FILE --init-from RUN_OR_CHECKPOINT_DIR
    coe-dist bench comm --nproc 2 --grid configs/bench/ci.yaml | bench project --profile PROFILE --gpus 8,64
    coe-dist slurm submit --config FILE --nodes N --procs-per-node P [--check] [--dry-run] [--wait] | status | cancel
    coe-dist check --config FILE [--nproc P]      preflight of this machine for that config (first step on a cluster)

Exit codes: 0 success, 1 runtime error (data, launch, I/O), 2 bad configuration or arguments.
User errors print one line; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from coe_dist.argtypes import OneLineParser, positive_int
from coe_dist.cli_common import add_config_args, parse_and_run, spawn_torchrun
from coe_dist.config import ConfigError, check_world, expand_path, load_config


def _train(args: argparse.Namespace) -> int:
    if args.init_from:
        from coe_dist.train.checkpoint import architecture_overrides

        if not os.path.isdir(args.init_from):
            raise ConfigError(f"--init-from {args.init_from}: no such directory; give a run or checkpoint directory "
                              "(e.g. one written by coe-dist convert import) or a reference-layout export")

        # The checkpoint's model and moe sections first: the weights decide the architecture; --set still wins.
        args.overrides = [f"train.init_from={args.init_from}", *architecture_overrides(args.init_from),
                          *args.overrides]
        args.init_from = None
    cfg = load_config(args.config, args.overrides)
    if args.nproc > 1:
        check_world(cfg, args.nproc)  # fail before starting any process
        return _spawn_locked(cfg, args)
    from coe_dist.train import allocator
    from coe_dist.train.loop import train

    # Every trainer process, before its model exists: the malloc thresholds only affect later blocks.
    note = allocator.configure()
    train(cfg, resume=args.resume, overwrite=args.overwrite, startup_notes=[note])
    return 0


def _spawn_locked(cfg, args: argparse.Namespace) -> int:
    """The run-directory checks and lock, here before any trainer starts; the lock is held for the job."""
    from pathlib import Path

    from coe_dist.data.loader import check_dataset_files
    from coe_dist.faults import restart_count
    from coe_dist.train import rundir

    run_dir = Path(cfg.log.run_dir)
    rundir.check_run_dir(run_dir)
    rundir.preflight(cfg, args.resume, args.overwrite, restart_count() > 0)
    check_dataset_files(cfg)
    lock = rundir.RunLock(run_dir)
    lock.acquire(say=print)
    try:  # LOCK_OWNER_VAR: rank 0 then knows the lock is held for it
        return spawn_torchrun(args.nproc, ["coe_dist.train", *_train_argv(args)],
                              env={rundir.LOCK_OWNER_VAR: str(os.getpid())}, debug=getattr(args, "debug", False))
    finally:
        lock.release()


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The trainer's arguments of a parsed `train` command line, for every rank torchrun starts."""
    argv = ["--config", args.config] if args.config else []
    for override in args.overrides:
        argv += ["--set", override]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.overwrite:
        argv.append("--overwrite")
    if getattr(args, "debug", False):
        argv.append("--debug")
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="coe-dist",
        description="Train Chain-of-Experts (CoE) language models with expert parallelism under DeepSpeed ZeRO.",
        epilog="Start with: coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="pretrain a CoE model (one process, or --nproc P via torchrun's agent)",
                           description="Pretrain a CoE language model. Under torchrun/srun/mpirun each process "
                                       "runs this command; --nproc P starts P local processes through torchrun.")
    add_config_args(train)
    train.add_argument("--nproc", type=positive_int, default=1, help="processes to start on this node (default 1)")
    train.add_argument("--resume", metavar="auto|PATH", type=expand_path,
                       help="continue from the newest complete checkpoint in <run_dir>/checkpoints (auto) or from "
                            "a checkpoint directory; any expert-parallel layout")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a log.run_dir that holds an earlier run's checkpoints, deleting them "
                            "(and its metrics, TensorBoard events and samples); without it such a start is refused")
    train.add_argument("--init-from", metavar="PATH", type=expand_path,
                       help="start a new run (step 0, fresh optimizer) from the weights of a coe-dist checkpoint or "
                            "run dir, e.g. one made by `coe-dist convert import`; its model and moe sections and "
                            "data.tokenizer replace the config's (runtime keys such as moe.ep_size stay)")
    # SUPPRESS: without it this default would overwrite a `coe-dist --debug train ...` given before.
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    from coe_dist import slurm
    from coe_dist.bench import cli as bench_cli
    from coe_dist.check import cli as check_cli
    from coe_dist.data import preprocess
    from coe_dist.train import convert, inference, placement

    preprocess.register_cli(sub)
    inference.register_cli(sub)
    convert.register_cli(sub)
    placement.register_cli(sub)
    slurm.register_cli(sub)
    bench_cli.register_cli(sub)
    check_cli.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return parse_and_run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
