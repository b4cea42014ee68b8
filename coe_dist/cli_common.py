"""What every `coe-dist` subcommand's command line shares, below all of them (cli.py, bench/cli.py,
check/cli.py import this; it imports none of them):

    add_config_args(parser)        --config FILE --set SECTION.KEY=VALUE ...
    run_parsed(args)               args.func(args) with the exit codes: 0 ok, 1 runtime error, 2 configuration
    parse_and_run(parser, argv)    parse, then run_parsed
    fail(args, message, code)      one line on stderr (the traceback only with --debug)
    under_launcher()               is this process one rank of a torchrun/srun/mpirun job?
    spawn_torchrun(nproc, module_argv)   re-run a module under torchrun with N local ranks on loopback
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback

from coe_dist.config import ConfigError
from coe_dist.errors import UserError

EXIT_RUNTIME, EXIT_CONFIG = 1, 2


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (e.g. configs/tiny.yaml); defaults apply to missing keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=50 --set moe.ep_size=2 (repeatable)")


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"coe-dist: {message}", file=sys.stderr, flush=True)
    return code


def run_parsed(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; a user error becomes one line and exit code 2 (config) or 1 (the rest)."""
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return fail(args, f"config error: {e}", EXIT_CONFIG)
    except (UserError, FileNotFoundError, PermissionError) as e:
        return fail(args, f"error: {e}", EXIT_RUNTIME)


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


def spawn_torchrun(nproc: int, module_argv: list[str], env: dict[str, str] | None = None) -> int:
    """Re-launch `python -m MODULE ARGS` under torchrun with `nproc` ranks on this node. The rendezvous
    endpoint, the trainers' store and (see coe_dist.launcher) gloo stay on loopback; temporary files go to a
    private directory, removed afterwards. `env`: variables added for the ranks."""
    # --local-addr: the trainers' MASTER_ADDR (torchrun would give them this host's FQDN, whose address may be
    # the LAN's); --standalone would name the endpoint localhost, which may resolve to ::1 first.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=coe-dist", "--local-addr=127.0.0.1",
           "-m", *module_argv]
    print("coe-dist: " + " ".join(cmd[1:]), flush=True)
    # mkdtemp: mode 0700. torchrun's log directory (torchelastic_*, never removed by torchrun) lands in it.
    with tempfile.TemporaryDirectory(prefix="coe-dist-") as tmp:
        # torchrun's agent keeps its rendezvous store across restarts unless told not to; restarted ranks
        # would read the previous attempt's addresses and hang (pytorch/pytorch#135712). Unshared, the
        # trainers' store is rank 0's, bound to 127.0.0.1, not a second agent store on every interface.
        full_env = {**os.environ, **(env or {}), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TMPDIR": tmp}
        return _wait_through_ctrl_c(subprocess.Popen(cmd, env=full_env))


def _wait_through_ctrl_c(proc: subprocess.Popen) -> int:
    """Wait for torchrun even after Ctrl-C: the terminal sent SIGINT to it too, and it is stopping the ranks
    (killing it would leave them running, writing into the temporary directory about to be removed)."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue
