"""What every `coe-dist` subcommand's command line shares, below all of them (cli.py, bench/cli.py,
check/cli.py import this; it imports none of them):

    add_config_args(parser)        --config FILE --set SECTION.KEY=VALUE ...
    run_parsed(args)               args.func(args) with the exit codes: 0 ok, 1 runtime error, 2 configuration
    parse_and_run(parser, argv)    parse, then run_parsed
    fail(args, message, code)      one line on stderr (the traceback only with --debug)
    under_launcher()               is this process one rank of a torchrun/srun/mpirun job?
    spawn_torchrun(nproc, module_argv)   run a module as N local ranks under torchrun's agent (local_launch)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from coe_dist.atomic_file import DISK_ERRNOS
from coe_dist.config import ConfigError, expand_path
from coe_dist.errors import UserError

EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=expand_path,
                   help="YAML run config (e.g. configs/tiny.yaml); defaults apply to missing keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=50 --set moe.ep_size=2 (repeatable)")


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    line = f"coe-dist: {message}"
    from coe_dist.local_launch import write_error

    if not write_error(line, code):  # a rank under --nproc hands its line to the launcher, printed once
        print(line, file=sys.stderr, flush=True)
    return code


def run_parsed(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; a user error becomes one line and exit code 2 (config) or 1 (the rest)."""
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return fail(args, f"config error: {e}", EXIT_CONFIG)
    except (UserError, FileNotFoundError, PermissionError) as e:
        return fail(args, f"error: {e}", EXIT_RUNTIME)
    except OSError as e:  # a full (or read-only) file system under any command: one line, not a traceback
        if e.errno not in DISK_ERRNOS:
            raise
        return fail(args, f"error: could not write {e.filename or 'a file'}: {e.strerror}: free space or write "
                          "elsewhere", EXIT_RUNTIME)


def parse_and_run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """A module's own `main`: parse (argparse exits 2 for bad arguments, 0 for --help), then run_parsed."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return run_parsed(args)


def under_launcher() -> bool:
    """True in a rank of a job that a launcher started (torchrun, an srun task, mpirun)."""
    from coe_dist.launcher import MPI_MARKERS, TORCHRUN_MARKERS

    env = os.environ
    return (any(k in env for k in TORCHRUN_MARKERS) or ("SLURM_STEP_ID" in env and "SLURM_PROCID" in env)
            or any(k in env for k in MPI_MARKERS))


def spawn_torchrun(nproc: int, module_argv: list[str], env: dict[str, str] | None = None, *,
                   debug: bool = False) -> int:
    """Run `python -m MODULE ARGS` as `nproc` ranks on this node under torchrun's agent, in this process
    (coe_dist.local_launch: one PID, signals passed on to every rank, one-line errors). `env`: variables
    added for the ranks."""
    from coe_dist import local_launch

    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        return local_launch.run_local(nproc, module_argv[0], module_argv[1:], debug=debug)
    finally:
        os.environ.clear()
        os.environ.update(saved)
