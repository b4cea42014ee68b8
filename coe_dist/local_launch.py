"""`coe-dist train --nproc N` (and `bench comm --nproc N`): N processes on this machine under torchrun's
elastic agent, run inside this process, so that the job is this one PID.

    coe-dist train --nproc N -> run_local -> torchrun's agent (here) -> N x `python -m coe_dist.train ...`
    SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1 to this PID -> the agent passes it to every trainer -> they save a
        checkpoint and exit -> exit 128 + signal; a trainer still running afterwards is stopped here
    a trainer fails -> it writes its one-line error to <private tmp>/errors/rank<R>.json instead of stderr
        -> the first failure's line is printed here, once, and its exit code returned (no ChildFailedError dump)

Leftover RANK/WORLD_SIZE/... of the user's shell are dropped (the agent gives each trainer its own), and
--nproc inside a job another launcher started is refused: it would nest jobs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from coe_dist.launcher import MPI_MARKERS, LaunchError

ERROR_DIR_VAR = "COE_DIST_ERROR_DIR"  # set for the trainers: where each writes its one-line error
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
SHUTDOWN_TIMEOUT_S = 100  # how long the trainers get to save after a signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
# Variables a launcher sets for its processes: left in a shell (an `export RANK=0` from another job) they
# mean nothing to --nproc, which starts every rank itself.
LEFTOVER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT")
ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")


def run_local(nproc: int, module: str, module_args: list[str], *, debug: bool = False) -> int:
    """Run `python -m module *module_args` as nproc ranks (e.g. coe_dist.train); the exit code of the job."""
    if "TORCHELASTIC_RUN_ID" in os.environ or any(k in os.environ for k in MPI_MARKERS):
        raise LaunchError(f"--nproc {nproc} inside a job that torchrun or MPI already started: drop --nproc "
                          "(the launcher starts the processes), or run coe-dist train --nproc from a plain shell")
    dropped = [k for k in LEFTOVER_VARS if k in os.environ]
    if dropped:
        print(f"coe-dist: ignoring {', '.join(f'{k}={os.environ[k]}' for k in dropped)} from the environment: "
              f"--nproc {nproc} starts and numbers its own ranks", flush=True)
    cmd = ["--nproc-per-node", str(nproc), "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "--rdzv-id=coe-dist", "--local-addr=127.0.0.1", "--monitor-interval=0.2", "-m", module, *module_args]
    print("coe-dist: torchrun " + " ".join(cmd), flush=True)
    return run_torchrun(cmd, drop=dropped, debug=debug)


def _is_rendezvous_teardown_race(unraisable) -> bool:
    """torchrun's rendezvous keep-alive thread is stopped by a weakref finalizer; when the collector runs it on
    that thread itself (at exit, now and then) it prints "Exception ignored ... cannot join current thread":
    a harmless race inside torch, not the job's outcome."""
    exc, tb, names = unraisable.exc_value, unraisable.exc_traceback, set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return isinstance(exc, RuntimeError) and str(exc) == "cannot join current thread" and "_stop_thread" in names


def _drop_rendezvous_teardown_race(unraisable, hook=sys.unraisablehook) -> None:
    if not _is_rendezvous_teardown_race(unraisable):
        hook(unraisable)


def run_torchrun(torchrun_args: list[str], *, drop: Sequence[str] = (), debug: bool = False) -> int:
    """torchrun with these arguments (any of its options, then the program), its agent in this process: the
    exit code of the job, 128 + a signal that stopped it, or a failed trainer's code after its one line."""
    sys.unraisablehook = _drop_rendezvous_teardown_race  # for the rest of this process: the race is at exit
    # mkdtemp: mode 0700. torchrun's log directory and the trainers' temporary files land in it.
    with tempfile.TemporaryDirectory(prefix="coe-dist-") as tmp, _job_environment(tmp, drop), \
            _quiet_agent(debug), _signals_restored():
        errors = Path(tmp) / "errors"
        errors.mkdir()
        os.environ[ERROR_DIR_VAR] = str(errors)
        return _run_agent(torchrun_args, errors)


def main(argv: list[str] | None = None) -> int:
    """`python -m coe_dist.local_launch [torchrun options] -m coe_dist.train ...`: what launch/torchrun.sh runs."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run_torchrun(argv, debug="--debug" in argv)
    except LaunchError as e:
        print(f"coe-dist: error: {e}", file=sys.stderr, flush=True)
        return 1


def _run_agent(cmd: list[str], errors: Path) -> int:
    """torchrun's own main, less its @record wrapper (the ChildFailedError dump, a traceback for a signal)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(cmd)
    # Until the agent starts the trainers and takes these over itself: a signal during the rendezvous ends it
    # the same way (an exception, not Python's KeyboardInterrupt traceback or SIGTERM's silent death).
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), _terminate_process_handler)
    # Children this process had before the agent ran are not trainers (a launch script's helpers, once it
    # exec'd into this process): a stop does not wait for them.
    others = set(_children())
    try:
        run(args)
    except SignalException as e:
        _stop_children(e.sigval, ignore=others)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        line, code = failure_line(e.failures, read_errors(errors))
        print(line, file=sys.stderr, flush=True)
        return code
    return 0


@contextlib.contextmanager
def _job_environment(tmp: str, dropped: Sequence[str]) -> Iterator[None]:
    """The trainers' environment (the agent passes os.environ on), restored afterwards for callers in-process."""
    saved, saved_tempdir = dict(os.environ), tempfile.tempdir
    tempfile.tempdir = tmp  # the agent's own files (torchrun's torchelastic_* log directory) go there too
    for key in dropped:
        del os.environ[key]
    # A fresh rendezvous store per restart (pytorch/pytorch#135712); unshared, rank 0 serves the trainers'
    # store on 127.0.0.1 only, not the agent on every interface.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ["TMPDIR"] = tmp
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", ",".join(STOP_SIGNALS))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        tempfile.tempdir = saved_tempdir


@contextlib.contextmanager
def _quiet_agent(debug: bool) -> Iterator[None]:
    """The agent logs each worker's start, signal and failure (and the ChildFailedError dump follows); the
    trainers' own lines say what happened. --debug keeps the agent's log."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(name) for name in ELASTIC_LOGGERS]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.handlers = False, [logging.NullHandler()]
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.propagate, lg.handlers = propagate, handlers


@contextlib.contextmanager
def _signals_restored() -> Iterator[None]:
    """The agent installs its signal handlers for good; a caller in the same process gets its own back."""
    saved = {name: signal.getsignal(getattr(signal, name)) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in saved.items():
            signal.signal(getattr(signal, name), handler)


# ---------------------------------------------------------------- stopping

def _children() -> list[int]:
    """PIDs of this process's live children (the trainers the agent started), from /proc."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _stop_children(sig: signal.Signals, timeout_s: float | None = None, ignore: Collection[int] = ()) -> None:
    """After the agent gave up on a signal (a second signal cut its wait short): pass the signal on to the
    trainers still running, wait for their checkpoint, then kill them. No trainer outlives the job.
    Signals that come meanwhile are passed on too (a later SIGTERM makes a trainer exit at once)."""
    timeout_s = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)) if timeout_s is None \
        else timeout_s
    pids = [p for p in _children() if p not in ignore]
    if not pids:
        return

    def forward(signum: int, frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), forward)
    forward(sig, None)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if not _reaped(p)]
        time.sleep(0.2)
    for pid in pids:
        print(f"coe-dist: trainer pid {pid} did not stop within {timeout_s:g} s of {sig.name} "
              "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT): killed", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # already reaped (by the agent's Popen)
        return True


# ---------------------------------------------------------------- one line for a failed job

def write_error(message: str, code: int) -> bool:
    """In a trainer under run_local: hand this one-line error to the launcher instead of printing it; False
    when there is no launcher to hand it to (the caller prints it)."""
    directory, rank = os.environ.get(ERROR_DIR_VAR), os.environ.get("RANK")
    if not directory or rank is None:
        return False
    path = Path(directory) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"rank": int(rank), "message": message, "code": code, "time": time.time()}))
        tmp.replace(path)
    except (OSError, ValueError):
        return False
    return True


def read_errors(directory: Path) -> dict[int, dict]:
    """rank -> {message, code, time} of the trainers that wrote their error."""
    found = {}
    for path in directory.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            found[int(record["rank"])] = record
    return found


def _death(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"rank {rank} died of {signal.Signals(-exitcode).name}"
        return f"rank {rank} died of signal {-exitcode}"
    return f"rank {rank} exited with code {exitcode} without an error message (its output above says why)"


def failure_line(failures: dict, errors: dict[int, dict]) -> tuple[str, int]:
    """One line and an exit code for a failed job: the first trainer's own message and code; a rank that
    died without one (a signal, a crash) is named first, then the first message of a survivor."""
    silent = sorted((rank, f.exitcode) for rank, f in failures.items() if rank not in errors)
    first = min(errors.values(), key=lambda r: r["time"], default=None)
    if not silent and first is not None:
        return first["message"], int(first["code"])
    deaths = "; ".join(_death(rank, code) for rank, code in silent)
    if first is None:
        return f"coe-dist: error: {deaths}", 1
    then = _strip_prefix(first["message"])
    then = then if then.startswith("rank ") else f"rank {first['rank']}: {then}"
    return f"coe-dist: error: {deaths}; then {then}", 1


def _strip_prefix(message: str) -> str:
    for prefix in ("coe-dist: error: ", "coe-dist: config error: ", "coe-dist: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


if __name__ == "__main__":
    sys.exit(main())
