"""Run `coe-dist train` as real processes (one process, or torchrun with gloo) and read what it logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "coe_dist.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "coe_dist.train", *args]


def run_train(nproc: int, run_dir: Path, *overrides: str, config: Path = TINY, extra: tuple[str, ...] = (),
              timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["--config", str(config), "--set", f"log.run_dir={run_dir}"]
    for o in overrides:
        args += ["--set", o]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(train_cmd(nproc, *args, *extra), capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def call_main(argv: list[str]) -> tuple[object, str, str]:
    """`coe_dist.cli.main(argv)` in this process (a worker running many cases after one import):
    (exit code, or "raised" with the traceback on stderr; stdout; stderr)."""
    import contextlib
    import io
    import traceback

    from coe_dist.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = "raised"
    return code, out.getvalue(), err.getvalue()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training LM loss, from metrics.jsonl (the last record for a step wins, as after a resume)."""
    return {m["step"]: m["lm_loss"] for m in metrics(run_dir) if "lm_loss" in m}
