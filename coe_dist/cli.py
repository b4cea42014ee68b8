"""`coe-dist`: the command line.

    coe-dist train --config configs/tiny.yaml [--set section.key=value ...] [--nproc P]
    coe-dist preprocess --input FILES --tokenizer TOKENIZER --output PREFIX [--fields question,answer]
    coe-dist eval --checkpoint RUN_OR_CHECKPOINT_DIR
    coe-dist generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt TEXT
    coe-dist convert export --checkpoint RUN_OR_CHECKPOINT_DIR --output DIR [--format hf|reference]
    coe-dist convert import --from-hf DIR --iterations C --output RUN_DIR | --from-reference DIR --output RUN_DIR
    coe-dist train --config FILE --init-from RUN_OR_CHECKPOINT_DIR
    coe-dist bench comm --nproc 2 --grid configs/bench/ci.yaml | bench project --profile PROFILE --gpus 8,64
    coe-dist slurm submit --config FILE --nodes N --procs-per-node P [--dry-run] [--wait] | status JOBID | cancel JOBID

Exit codes: 0 success, 1 runtime error (data, launch, I/O), 2 bad configuration or arguments.
User errors print one line; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback

from coe_dist.config import ConfigError, check_world, load_config
from coe_dist.errors import UserError

EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (e.g. configs/tiny.yaml); defaults apply to missing keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=50 --set moe.ep_size=2 (repeatable)")


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
    if args.nproc > 1 and "RANK" not in os.environ:
        check_world(cfg, args.nproc)  # fail before starting any process
        return _spawn_torchrun(args)
    from coe_dist.train import allocator
    from coe_dist.train.loop import train

    # Every trainer process, before its model exists: the malloc thresholds only affect later blocks.
    note = allocator.configure()
    train(cfg, resume=args.resume, startup_notes=[note])
    return 0


def _spawn_torchrun(args: argparse.Namespace) -> int:
    """Re-launch this command under torchrun on this node. The rendezvous endpoint, the trainers' store and (see
    coe_dist.launcher) gloo stay on loopback; temporary files go to a private directory, removed afterwards."""
    # --local-addr: the trainers' MASTER_ADDR (torchrun would give them this host's FQDN, whose address may be
    # the LAN's); --standalone would name the endpoint localhost, which may resolve to ::1 first.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--nnodes=1",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=coe-dist", "--local-addr=127.0.0.1",
           "-m", "coe_dist.train"]
    if args.config:
        cmd += ["--config", args.config]
    for override in args.overrides:
        cmd += ["--set", override]
    if args.resume:
        cmd += ["--resume", args.resume]
    if getattr(args, "debug", False):
        cmd.append("--debug")
    print("coe-dist: " + " ".join(cmd[1:]), flush=True)
    # mkdtemp: mode 0700. torchrun's log directory (torchelastic_*, never removed by torchrun) lands in it.
    with tempfile.TemporaryDirectory(prefix="coe-dist-") as tmp:
        # torchrun's agent keeps its rendezvous store across restarts unless told not to; restarted ranks
        # would read the previous attempt's addresses and hang (pytorch/pytorch#135712). Unshared, the
        # trainers' store is rank 0's, bound to 127.0.0.1, not a second agent store on every interface.
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TMPDIR": tmp}
        return _wait_through_ctrl_c(subprocess.Popen(cmd, env=env))


def _wait_through_ctrl_c(proc: subprocess.Popen) -> int:
    """Wait for torchrun even after Ctrl-C: the terminal sent SIGINT to it too, and it is stopping the trainers
    (killing it would leave them running, writing into the temporary directory about to be removed)."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coe-dist",
        description="Train Chain-of-Experts (CoE) language models with expert parallelism under DeepSpeed ZeRO.",
        epilog="Start with: coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="pretrain a CoE model (one process, or --nproc P via torchrun)",
                           description="Pretrain a CoE language model. Under torchrun/srun/mpirun each process "
                                       "runs this command; --nproc P starts P local processes through torchrun.")
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=1, help="processes to start on this node (default 1)")
    train.add_argument("--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint in "
                       "<run_dir>/checkpoints (auto) or from a checkpoint directory; any expert-parallel layout")
    train.add_argument("--init-from", metavar="PATH", help="start a new run (step 0, fresh optimizer) from the "
                       "weights of a coe-dist checkpoint or run dir, e.g. one made by `coe-dist convert import`; "
                       "its model and moe sections and data.tokenizer replace the config's (runtime keys "
                       "such as moe.ep_size stay)")
    # SUPPRESS: without it this default would overwrite a `coe-dist --debug train ...` given before.
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    from coe_dist import slurm
    from coe_dist.bench import cli as bench_cli
    from coe_dist.data import preprocess
    from coe_dist.train import convert, inference

    preprocess.register_cli(sub)
    inference.register_cli(sub)
    convert.register_cli(sub)
    slurm.register_cli(sub)
    bench_cli.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 for bad arguments, 0 for --help
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return _fail(args, f"config error: {e}", EXIT_CONFIG)
    except (UserError, FileNotFoundError, PermissionError) as e:
        return _fail(args, f"error: {e}", EXIT_RUNTIME)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"coe-dist: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
