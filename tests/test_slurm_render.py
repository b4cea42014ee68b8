"""`coe-dist slurm submit --dry-run` and friends without a cluster: rendering, checks, error messages."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coe_dist import slurm

REPO = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    from coe_dist.cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if any("slurm" in a.choices for a in subs):
        return [sys.executable, "-m", "coe_dist.cli", "slurm"]
    return [sys.executable, "-m", "coe_dist.slurm"]  # until cli.py registers the subcommand


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def dry_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("submit", "--config", "configs/tiny.yaml", "--set", f"log.run_dir={tmp_path / 'run'}", "--dry-run",
               *extra)


def test_dry_run_renders_resources_and_arguments(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--nodes", "2", "--procs-per-node", "4", "--partition", "gpu", "--time", "01:30:00",
                  "--gpus-per-node", "4", "--set", "train.steps=7", "--set", "log.run_dir=runs/with space")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=gpu", "#SBATCH --time=01:30:00",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --job-name=coe-tiny", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "export PROCS_PER_NODE=4", f"export PYTHON={sys.executable}",
                 f"#SBATCH --chdir={REPO}"):
        assert line in script.splitlines(), line
    assert script.count("#SBATCH --nodes=") == 1  # replaced, not added twice
    assert f'#SBATCH --output="{REPO / "runs/with space"}/slurm-%j.out"' in script  # one option, quoted
    assert f"set -- {REPO / 'configs/tiny.yaml'} --set" in script
    assert "'log.run_dir=runs/with space'" in script  # quoted for the shell
    assert "# would run: sbatch --parsable" in out.stderr
    assert not (tmp_path / "run").exists(), "--dry-run writes nothing"
    # Slurm reads #SBATCH lines only before the first command: the rendered block must come after them.
    lines = script.splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    first_cmd = min(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert first_cmd > last_sbatch


def test_rendered_script_passes_shellcheck_and_bash_n(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--nodes", "2", "--procs-per-node", "2", "--container", "docker://nvcr.io#org/coe:1")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "rendered.sbatch"
    path.write_text(out.stdout)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck:
        sc = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
        assert sc.returncode == 0, sc.stdout
    assert "export CONTAINER_IMAGE='docker://nvcr.io#org/coe:1'" in out.stdout
    assert "export PYTHON=" not in out.stdout  # the image's own python runs inside the container


def test_rendered_script_runs_its_defaults_without_arguments(tmp_path: Path) -> None:
    """The saved script is self-contained: with no arguments it trains what was submitted."""
    out = dry_run(tmp_path, "--procs-per-node", "2", "--set", "train.steps=3")
    assert out.returncode == 0, out.stderr
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, body in (("scontrol", 'echo "$SLURM_JOB_NODELIST"'), ("srun", 'echo "SRUN $*"')):
        (fake_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (fake_bin / name).chmod(0o700)
    path = tmp_path / "rendered.sbatch"
    path.write_text(out.stdout)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_ON_NODE": "2"}
    res = subprocess.run(["bash", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    srun = next(line for line in res.stdout.splitlines() if line.startswith("SRUN "))
    assert "--rdzv-endpoint=n1:29407" in srun and "--nproc-per-node=2" in srun
    assert f"--config {REPO / 'configs/tiny.yaml'} --resume auto --set log.run_dir=" in srun
    assert srun.endswith("--set train.steps=3")


@pytest.mark.parametrize("args, code, needle", [
    (["--procs-per-node", "1"], 2, "moe.ep_size=2 does not divide the world size 1"),
    (["--procs-per-node", "2", "--time", "tomorrow"], 2, "--time 'tomorrow'"),
    (["--procs-per-node", "2", "--set", "train.stepz=3"], 2, "unknown key 'train.stepz'"),
    (["--procs-per-node", "2", "--template", "nope.sbatch"], 1, "batch template nope.sbatch does not exist"),
    (["--procs-per-node", "0"], 2, "argument --procs-per-node: 0 is not allowed"),
])
def test_submit_errors(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    out = dry_run(tmp_path, *args)
    assert out.returncode == code, out.stderr
    assert needle in out.stderr


def test_without_slurm_commands(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}  # no sbatch, squeue or scancel anywhere
    for args in (["status", "12"], ["cancel", "12"],
                 ["submit", "--config", "configs/tiny.yaml", "--procs-per-node", "2", "--set",
                  f"log.run_dir={tmp_path / 'run'}"]):
        out = run(*args, env=env)
        assert out.returncode == 1
        assert "not found on PATH" in out.stderr and "scripts/local-slurm.sh start" in out.stderr


def test_bad_job_id() -> None:
    out = run("status", "12; rm -rf /")
    assert out.returncode == 1 and "is not a Slurm job id" in out.stderr


def test_render_without_sbatch_lines() -> None:
    with pytest.raises(slurm.SlurmError, match="no #SBATCH lines"):
        slurm.render("#!/bin/bash\necho hi\n", directives={}, env={}, args=[], source="x.sh")


def test_render_removes_and_adds_directives() -> None:
    text = "#!/bin/bash\n#SBATCH --exclusive\n#SBATCH --nodes=1\necho run\n"
    out = slurm.render(text, directives={"exclusive": None, "nodes": "3", "qos": "high"}, env={"A": "b c"},
                       args=["x y"], source="t")
    lines = out.splitlines()
    assert "#SBATCH --exclusive" not in lines
    assert lines[1:3] == ["#SBATCH --nodes=3", "#SBATCH --qos=high"]
    assert "export A='b c'" in lines and "if [ $# -eq 0 ]; then set -- 'x y'; fi" in lines
    assert lines[-1] == "echo run"


@pytest.mark.parametrize("make", ["world-writable", "symlink"])
def test_local_slurm_script_refuses_unsafe_state_dirs(tmp_path: Path, make: str) -> None:
    """The daemons run as root and the script wipes state under DIR: a directory others control is refused."""
    target = tmp_path / "state"
    target.mkdir()
    if make == "world-writable":
        target.chmod(0o777)
        needle = "writable by group or others"
    else:
        target = tmp_path / "link"
        target.symlink_to(tmp_path / "state")
        needle = "symbolic link"
    out = subprocess.run(["bash", str(REPO / "scripts" / "local-slurm.sh"), "status", str(target)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert needle in out.stderr


def test_check_job_renders_the_check_on_the_same_layout(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "--check", "--nodes", "2", "--procs-per-node", "8", "--tasks", "srun",
                  "--set", "moe.ep_size=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --time=00:30:00", "#SBATCH --job-name=coe-check-tiny",
                 "#SBATCH --ntasks-per-node=1", "export PROCS_PER_NODE=8", "export COMMAND=check"):
        assert line in lines, line
    assert "#SBATCH --requeue" not in lines  # a check is rerun, not requeued
    assert '-m coe_dist.cli "${command[@]}" --config "$config" "$@"' in out.stdout  # slurm/bench.sbatch
    assert f"set -- {REPO / 'configs/tiny.yaml'} --set " in out.stdout and "--set moe.ep_size=2; fi" in out.stdout
