"""`coe-dist slurm submit|status|cancel`: submit slurm/train.sbatch without hiding it.

    coe-dist slurm submit --config FILE --nodes N --procs-per-node P [--partition Q] [--account A] [--time T]
                          [--gpus-per-node G] [--container IMAGE] [--set K=V ...] [--dry-run] [--wait]
                          [--check]   (`coe-dist check` on that layout instead: slurm/bench.sbatch)
    coe-dist slurm status JOBID
    coe-dist slurm cancel JOBID [--requeue]

`submit` renders the template (slurm/train.sbatch) into a self-contained script: the #SBATCH lines
carry the resources asked for (each value checked, or quoted, so that it stays one option on one line:
nothing typed can add lines or options), an added block sets PROCS_PER_NODE, PYTHON and CONTAINER_IMAGE,
and the config and overrides become the script's default arguments (shell-quoted). The script is saved as
<run_dir>/slurm-<time>.sbatch (so the run dir records exactly what ran) and submitted with sbatch;
--dry-run prints it and the sbatch command instead. Plain sbatch and squeue/scontrol/scancel do
the work: nothing here is needed to run, inspect or resubmit a job by hand.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coe_dist.argtypes import OneLineParser, positive_float, positive_int
from coe_dist.config import ConfigError, check_world, load_config
from coe_dist.launcher import LaunchError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
# `submit --check`: `coe-dist check` on every process of the same layout, as a short job (no requeue).
CHECK_TEMPLATE = TEMPLATE.with_name("bench.sbatch")
CHECK_TIME = "00:30:00"
# States after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "NODE_FAIL", "PREEMPTED"}
TIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
# Names Slurm gives jobs, partitions and accounts: written into #SBATCH lines as they are.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
PARTITIONS_RE = re.compile(rf"{NAME_RE.pattern}(,{NAME_RE.pattern})*")
# sbatch splits an #SBATCH line into options at blanks, honours quotes and backslashes and ends it at an
# unquoted '#'. A value of these characters is one option as it stands; any other is put in double quotes,
# which cannot hold '"', '\\', '#' (older sbatch ends the line at '#' even inside quotes) or a line break.
PLAIN_VALUE_RE = re.compile(r"[A-Za-z0-9_.,:=+%@/-]+")
UNQUOTABLE = ('"', "\\", "#")


class SlurmError(LaunchError):
    """A Slurm command failed or is missing; the message says which and what to do."""


@dataclass
class Submission:
    script: str  # the rendered batch script
    sbatch: list[str]  # the sbatch command (its last element is the script's path)
    run_dir: Path
    log: Path  # Slurm's output file, %j filled in after submission
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- rendering

def directive_value(key: str, value: str) -> str:
    """`value` as sbatch will read it back whole on an #SBATCH line: as is, or double-quoted; else refused."""
    if PLAIN_VALUE_RE.fullmatch(value):
        return value
    if value.isprintable() and not any(c in value for c in UNQUOTABLE):
        return f'"{value}"'
    raise ConfigError(f"--{key} {value!r}: an #SBATCH value cannot hold a line break, control character, "
                      "'\"', '\\' or '#'; rename it (for paths: choose log.run_dir / a working directory without them)")


def _set_directive(lines: list[str], key: str, value: str | None) -> list[str]:
    """Replace `#SBATCH --key...` (or add it after the last #SBATCH line); value None removes it."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
        raise SlurmError(f"#SBATCH option name {key!r}: expected a long option name such as job-name")
    pattern = re.compile(rf"^#SBATCH\s+--{re.escape(key)}(=|\s|$)")
    new = None if value is None else (f"#SBATCH --{key}" + (f"={directive_value(key, value)}" if value else ""))
    out, done = [], False
    for line in lines:
        if pattern.match(line):
            if new is not None and not done:
                out.append(new)
            done = True
            continue
        out.append(line)
    if not done and new is not None:
        last = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
        out.insert(last + 1, new)
    return out


def render(template: str, *, directives: dict[str, str | None], env: dict[str, str], args: list[str],
           source: str) -> str:
    """The template with `directives` applied, then a block that exports `env` and defaults the arguments."""
    lines = template.splitlines()
    if not any(line.startswith("#SBATCH") for line in lines):
        raise SlurmError(f"template {source} has no #SBATCH lines: pass a batch script such as slurm/train.sbatch")
    for key, value in directives.items():
        lines = _set_directive(lines, key, value)
    # Slurm reads #SBATCH lines only up to the first command: the block goes after the last one.
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    # repr: a line break in the template's path must not start a line of its own.
    block = [f"# ---- rendered by `coe-dist slurm submit` from {source!r} at {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    block += [f"export {_env_name(k)}={shlex.quote(v)}" for k, v in env.items()]
    block += ["# Arguments given to sbatch after the script replace these.",
              "if [ $# -eq 0 ]; then set -- " + " ".join(shlex.quote(a) for a in args) + "; fi",
              "# ----"]
    lines[last + 1:last + 1] = block
    return "\n".join(lines) + "\n"


def _env_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise SlurmError(f"environment variable name {name!r}: expected letters, digits and '_'")
    return name


def _checked_name(option: str, value: str, pattern: re.Pattern[str], example: str) -> str:
    if not pattern.fullmatch(value):
        raise ConfigError(f"{option} {value!r}: expected letters, digits and . _ + - (e.g. {example}); "
                          "nothing else can be written into an #SBATCH line safely")
    return value


def _checked_sbatch_arg(arg: str) -> str:
    """An extra option for the sbatch command line: an option, on one line (a bare word would become the script)."""
    if not arg.startswith("-") or not arg.isprintable():
        raise ConfigError(f"--sbatch-arg {arg!r}: expected one sbatch option on one line, e.g. "
                          "--sbatch-arg=--qos=high")
    return arg


def _pattern_path(path: Path) -> str:
    """A directory as the start of an --output pattern: sbatch expands %x, %j...; '%%' is a literal '%'."""
    return str(path).replace("%", "%%")


def plan(args: argparse.Namespace) -> Submission:
    """Everything `submit` does short of running sbatch; errors before anything is written."""
    config = Path(args.config).resolve()
    cfg = load_config(config, args.overrides)  # ConfigError (exit 2) for a bad config or --set
    check_world(cfg, args.nodes * args.procs_per_node)
    if args.time and not TIME_RE.fullmatch(args.time):
        raise ConfigError(f"--time {args.time!r}: use minutes or [days-]hours:minutes:seconds, e.g. 04:00:00")
    job_name = _checked_name("--job-name", args.job_name, NAME_RE, "coe-tiny") if args.job_name else \
        "coe-" + ("check-" if args.check else "") + re.sub(r"[^A-Za-z0-9_.+-]", "-", config.stem)
    sbatch_args = [_checked_sbatch_arg(a) for a in args.sbatch_args]
    template = Path(args.template) if args.template else CHECK_TEMPLATE if args.check else TEMPLATE
    if not template.is_file():
        raise SlurmError(f"batch template {template} does not exist: pass --template slurm/train.sbatch from a "
                         "coe-dist checkout")
    run_dir = Path(cfg.log.run_dir).resolve()
    log = run_dir / "slurm-%j.out"
    directives: dict[str, str | None] = {
        "job-name": job_name,
        "nodes": str(args.nodes),
        "output": f"{_pattern_path(run_dir)}/slurm-%j.out",
        "chdir": str(Path.cwd()),
    }
    if args.tasks == "srun" and not args.check:  # bench.sbatch starts torchrun, one task per node
        directives["ntasks-per-node"] = str(args.procs_per_node)
    if args.partition:
        directives["partition"] = _checked_name("--partition", args.partition, PARTITIONS_RE, "gpu or gpu,debug")
    if args.account:
        directives["account"] = _checked_name("--account", args.account, NAME_RE, "proj42")
    if args.time or args.check:
        directives["time"] = args.time or CHECK_TIME
    if args.gpus_per_node:
        directives["gpus-per-node"] = str(args.gpus_per_node)
    if not args.exclusive:
        directives["exclusive"] = None
        directives["cpus-per-task"] = str(args.cpus_per_node) if args.cpus_per_node else None
    env = {"PROCS_PER_NODE": str(args.procs_per_node),
           **({"COMMAND": "check"} if args.check else {"TASKS": args.tasks})}
    if args.container:
        env["CONTAINER_IMAGE"] = args.container  # the image's own python3 runs inside
    else:
        env["PYTHON"] = sys.executable  # the interpreter running this command, venv included
    train_args = [str(config)]
    for override in args.overrides:
        train_args += ["--set", override]
    script = render(template.read_text(), directives=directives, env=env, args=train_args, source=str(template))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = run_dir / f"slurm-{'check-' if args.check else ''}{stamp}.sbatch"
    sbatch = ["sbatch", "--parsable", *sbatch_args, str(path)]
    return Submission(script, sbatch, run_dir, log, env)


# ---------------------------------------------------------------- running Slurm commands

def _run(cmd: list[str], what: str, timeout: float = 60) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found on PATH: run this on a Slurm login node, or start a local cluster "
                         "with `scripts/local-slurm.sh start` and export the SLURM_CONF it prints")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{what}: `{shlex.join(cmd)}` did not answer in {timeout:.0f} s: is slurmctld up "
                         "(`sinfo`)?") from None
    if out.returncode != 0:
        raise SlurmError(f"{what} failed: `{shlex.join(cmd)}`: {(out.stderr or out.stdout).strip()}")
    return out.stdout


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict, or None once Slurm has forgotten the job (MinJobAge after its end)."""
    try:
        text = _run(["scontrol", "show", "job", "-o", job_id], f"scontrol show job {job_id}")
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0] if text.strip() else ""))


def _check_job_id(job_id: str) -> str:
    if not re.fullmatch(r"\d+(_\d+)?(\+\d+)?", job_id):
        raise SlurmError(f"job id {job_id!r} is not a Slurm job id (a number such as 1234, as `submit` printed)")
    return job_id


class _LogFollower:
    """Prints lines appended to the job's log as they appear (the file exists once the job starts)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            print(line.decode(errors="replace"), flush=True)


def wait(job_id: str, log: Path | None, *, timeout: float | None, interval: float = 2.0, follow: bool = True) -> int:
    """Poll until the job reaches a final state, printing its log; return 0 for COMPLETED, else its exit code or 1."""
    start, state, follower = time.monotonic(), None, _LogFollower(log) if (log and follow) else None
    while True:
        info = job_info(job_id)
        if follower:
            follower.poll()
        if info is None:
            print(f"coe-dist: job {job_id} is no longer known to Slurm; its end state is unknown", file=sys.stderr)
            return 1
        if info.get("JobState") != state:
            state = info.get("JobState")
            print(f"coe-dist: job {job_id} {state} (restarts {info.get('Restarts', '0')})", file=sys.stderr,
                  flush=True)
        if state in FINAL_STATES:
            time.sleep(interval)  # the last lines may land after the state changes
            if follower:
                follower.poll()
            rc = int(info.get("ExitCode", "1:0").split(":")[0] or 1)
            elapsed = time.monotonic() - start
            print(f"coe-dist: job {job_id} {state}, exit code {info.get('ExitCode')}, after {elapsed:.0f} s",
                  file=sys.stderr, flush=True)
            return 0 if state == "COMPLETED" else (rc or 1)
        if timeout is not None and time.monotonic() - start > timeout:
            raise SlurmError(f"job {job_id} still {state} after --timeout {timeout:.0f} s; it keeps running: "
                             f"`coe-dist slurm status {job_id}` or `coe-dist slurm cancel {job_id}`")
        time.sleep(interval)


# ---------------------------------------------------------------- subcommands

def _submit(args: argparse.Namespace) -> int:
    sub = plan(args)
    if args.dry_run:
        print(sub.script, end="")
        print(f"# would run: {shlex.join(sub.sbatch)}", file=sys.stderr)
        return 0
    path = Path(sub.sbatch[-1])
    sub.run_dir.mkdir(parents=True, exist_ok=True)  # Slurm writes the log there and fails silently without it
    path.write_text(sub.script)
    out = _run(sub.sbatch, "sbatch")
    job_id = out.strip().split(";")[0]
    log = Path(str(sub.log).replace("%j", job_id))
    print(f"coe-dist: submitted job {job_id}\n"
          f"  script:      {path}\n"
          f"  log:         {log}\n"
          f"  tensorboard: tensorboard --logdir {sub.run_dir / 'tb'}\n"
          f"  checkpoints: {sub.run_dir / 'checkpoints'}\n"
          f"  status:      coe-dist slurm status {job_id}    cancel: coe-dist slurm cancel {job_id}", flush=True)
    if not args.wait:
        return 0
    return wait(job_id, log, timeout=args.timeout, follow=not args.quiet)


STATUS_KEYS = ("JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit", "NumNodes", "NodeList", "Restarts",
               "ExitCode", "SubmitTime", "StartTime", "EndTime", "StdOut")


def _status(args: argparse.Namespace) -> int:
    job_id = _check_job_id(args.job_id)
    info = job_info(job_id)
    if info is None:
        raise SlurmError(f"job {job_id} is not known to Slurm: it never existed or ended more than MinJobAge "
                         "(default 5 min) ago; `sacct -j` shows old jobs where accounting is set up")
    for key in STATUS_KEYS:
        if key in info:
            print(f"{key:<11} {info[key]}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    job_id = _check_job_id(args.job_id)
    if args.requeue:
        # What the time-limit warning does: the batch script has the trainers save, then requeues.
        _run(["scancel", "--batch", "--signal=USR1", job_id], "scancel")
        print(f"coe-dist: asked job {job_id} to checkpoint and requeue itself")
    else:
        _run(["scancel", job_id], "scancel")
        print(f"coe-dist: cancelled job {job_id}; its trainers save a checkpoint on the way out "
              "(resubmit with the same run_dir to continue)")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    slurm = subparsers.add_parser("slurm", help="submit, watch and cancel Slurm jobs (slurm/train.sbatch)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = slurm.add_subparsers(dest="slurm_command", metavar="ACTION", required=True)

    p = sub.add_parser("submit", help="render slurm/train.sbatch for a config and submit it")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, passed to the trainer (repeatable)")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--procs-per-node", type=positive_int, default=1,
                   help="trainer processes per node, e.g. GPUs (default 1)")
    p.add_argument("--gpus-per-node", type=positive_int, help="GPUs to request per node (default: none)")
    p.add_argument("--partition", help="Slurm partition (or several, comma-separated)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--time", help="time limit, e.g. 04:00:00 (default: the template's)")
    p.add_argument("--container", metavar="IMAGE", help="run in a container: pyxis/enroot image or apptainer .sif")
    p.add_argument("--tasks", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one srun task per node running torchrun (default); srun: one task per process")
    p.add_argument("--job-name", help="default coe-<config name>")
    p.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="share nodes with other jobs instead of taking them whole")
    p.add_argument("--cpus-per-node", type=positive_int, help="with --no-exclusive: CPUs per node to ask for")
    p.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--account=proj (repeatable)")
    p.add_argument("--template", help="batch script to render (default: slurm/train.sbatch of this checkout)")
    p.add_argument("--check", action="store_true",
                   help="instead of training: run `coe-dist check` on the same nodes and layout as a short job "
                        "(slurm/bench.sbatch, --time default 00:30:00)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, printing its log; exit with its code")
    p.add_argument("--timeout", type=positive_float, help="with --wait: give up waiting after this many seconds")
    p.add_argument("--quiet", action="store_true", help="with --wait: do not print the job's log")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", help="state, nodes, run time and log of a job")
    p.add_argument("job_id", metavar="JOBID")
    p.set_defaults(func=_status)

    p = sub.add_parser("cancel", help="cancel a job (its trainers save a checkpoint first)")
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--requeue", action="store_true",
                   help="instead: have it checkpoint and requeue itself, as before a time limit")
    p.set_defaults(func=_cancel)


def main(argv: list[str] | None = None) -> int:
    """`python -m coe_dist.slurm ...` = `coe-dist slurm ...`, with the same exit codes (2 config, 1 runtime)."""
    parser = OneLineParser(prog="coe-dist")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["slurm", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"coe-dist: config error: {e}", file=sys.stderr)
        return 2
    except (LaunchError, FileNotFoundError, PermissionError) as e:
        print(f"coe-dist: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
