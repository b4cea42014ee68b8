"""A real Slurm cluster on localhost (scripts/local-slurm.sh): submit, watch, cancel, resume, requeue.

Needs root (munged, slurmctld and slurmd run as root; the Debian packages are installed if missing); where
root or the packages are missing the tests are skipped, and fail in CI (tests/requires.py).
The cluster lives in a private temporary directory and is stopped at the end, also on failure.
Each job trains configs/tiny.yaml on 2 CPU processes for a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from requires import need, unavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-slurm.sh"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
# fp32: bf16 matmuls are emulated (~10x slower) on CPUs without AVX-512 BF16/AMX; no test here is about dtype
TINY = ["--set", "log.log_interval=1", "--set", "log.eval_interval=1000", "--set", "log.eval_batches=0",
        "--set", "train.dtype=fp32"]
STEP_RE = re.compile(r"^step\s+(\d+)/(\d+)\s+loss\s+([0-9.]+)", re.M)



@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    need(os.geteuid() == 0, "needs root: munged, slurmctld and slurmd run as root (and the Debian packages may "
         "need installing)")


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in SLURM_BINARIES)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _clean_env() -> dict[str, str]:
    """This environment without launcher variables of an outer job (pytest under torchrun or srun)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Start the cluster; yield the environment that reaches it; stop it whatever happens."""
    if not _have_slurm() and shutil.which("apt-get") is None:
        unavailable("Slurm is not installed and there is no apt-get to install it")
    state = Path(tempfile.mkdtemp(prefix="coe-slurm-"))  # 0700, ours: the script refuses shared dirs
    env = {**_clean_env(), "LOCAL_SLURM_PORT": str(_free_port_pair()), "LOCAL_SLURM_TIMEOUT": "60"}
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True,
                             timeout=900)
        if out.returncode != 0:
            if not _have_slurm():
                unavailable(f"apt-get could not install Slurm: {out.stderr.strip()[-500:]}")
            pytest.fail(f"local-slurm.sh start failed:\n{out.stderr}")
        env["SLURM_CONF"] = str(state / "slurm.conf")
        assert out.stdout.strip() == f"export SLURM_CONF={env['SLURM_CONF']}"
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _slurm_cli() -> list[str]:
    """`coe-dist slurm` (python -m coe_dist.cli) once cli.py registers it; until then the module's own main."""
    from coe_dist.cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if any("slurm" in a.choices for a in subs):
        return [sys.executable, "-m", "coe_dist.cli", "slurm"]
    return [sys.executable, "-m", "coe_dist.slurm"]


def coe_slurm(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*_slurm_cli(), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def _state(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def _final(env: dict[str, str], job: str, timeout: float) -> dict[str, str]:
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    return _wait_for(lambda: (s := _state(env, job)).get("JobState") in final and s, timeout, f"job {job} to end", 1)


def _checkpoint(run_dir: Path) -> tuple[int, Path]:
    from coe_dist.train import checkpoint

    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    meta = checkpoint.verify(root / name)  # every file present with its recorded sha256
    return int(meta["step"]), root / name


def test_submit_wait_trains(cluster: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = coe_slurm(cluster, "submit", "--config", "configs/tiny.yaml", "--nodes", "1", "--procs-per-node", "2",
                    "--time", "15", "--set", "train.steps=8", *TINY, "--set", f"log.run_dir={run_dir}",
                    "--wait", "--timeout", "600", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = _job_id(out.stdout)
    assert f"tensorboard --logdir {run_dir / 'tb'}" in out.stdout
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "launcher=torchrun world=2" in log
    assert "COMPLETED" in out.stderr
    losses = [float(x) for _, _, x in STEP_RE.findall(log)]
    assert len(losses) == 8, log[-3000:]
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m["lm_loss"] for m in metrics if "lm_loss" in m]
    assert len(logged) == 8 and all(abs(a - b) < 6e-5 for a, b in zip(losses, logged, strict=True))
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("lm_loss")] == list(range(1, 9))
    assert _checkpoint(run_dir)[0] == 8
    assert list(run_dir.glob("slurm-*.sbatch")), "the rendered script is kept in the run dir"

    status = coe_slurm(cluster, "status", job)
    assert status.returncode == 0, status.stderr
    assert re.search(r"JobState\s+COMPLETED", status.stdout), status.stdout


def test_cancel_leaves_checkpoint_and_resubmission_resumes(cluster: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", "--nodes", "1", "--procs-per-node", "2", "--time", "15",
              "--set", "train.steps=30", *TINY, "--set", f"log.run_dir={run_dir}"]
    out = coe_slurm(cluster, "submit", *common)
    assert out.returncode == 0, out.stderr
    job = _job_id(out.stdout)
    _wait_for(lambda: _logged_steps(run_dir) >= 2, 600, "two logged steps")
    cancel = coe_slurm(cluster, "cancel", job)
    assert cancel.returncode == 0, cancel.stderr
    assert _final(cluster, job, 120)["JobState"] == "CANCELLED"
    step, path = _checkpoint(run_dir)  # saved on SIGTERM, complete and verified
    assert 2 <= step < 30, f"checkpoint at step {step}"
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "stopped by signal" in log

    # Resubmit as one srun task per process: the trainers find their ranks in Slurm's variables.
    out = coe_slurm(cluster, "submit", *common, "--tasks", "srun", "--wait", "--timeout", "600", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (run_dir / f"slurm-{_job_id(out.stdout)}.out").read_text()
    assert "launcher=slurm world=2" in log
    assert f"resumed from {path} (step {step}" in log
    steps = [int(s) for s, _, _ in STEP_RE.findall(log)]
    assert steps == list(range(step + 1, 31)), steps
    assert _checkpoint(run_dir)[0] == 30


def test_time_limit_signal_checkpoints_and_requeues(cluster: dict[str, str], tmp_path: Path) -> None:
    """What Slurm's --signal=B:USR1@120 does before the time limit, sent by hand; plain sbatch usage."""
    run_dir = tmp_path / "run"
    env = {**cluster, "PROCS_PER_NODE": "2", "PYTHON": sys.executable}
    cmd = ["sbatch", "--parsable", f"--output={run_dir}/slurm-%j.out", "slurm/train.sbatch", "configs/tiny.yaml",
           "--set", "train.steps=16", *TINY, "--set", f"log.run_dir={run_dir}"]
    run_dir.mkdir()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    _wait_for(lambda: _logged_steps(run_dir) >= 2, 600, "two logged steps")
    requeue = coe_slurm(cluster, "cancel", "--requeue", job)
    assert requeue.returncode == 0, requeue.stderr
    # Requeued (same job id), started again, resumed, finished.
    state = _final(cluster, job, 600)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert state["Restarts"] == "1"
    assert "requeueing job" in log
    m = re.search(r"resumed from \S+ \(step (\d+)", log)
    assert m, log[-3000:]
    steps = [int(s) for s, _, _ in STEP_RE.findall(log)]
    resumed = int(m.group(1))
    assert steps[-(16 - resumed):] == list(range(resumed + 1, 17)), steps
    assert _checkpoint(run_dir)[0] == 16
