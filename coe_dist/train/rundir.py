"""A run directory belongs to one run: the checks before start-up, and the lock held while it runs.

    preflight(cfg, resume, overwrite)   before any process group (in every trainer, and in the parent of
        `coe-dist train --nproc`): the run dir can be written; a fresh start does not land on another run's
        checkpoints; a checkpoint to resume has this config's model shape and is behind train.steps
    RunLock(run_dir)   an advisory fcntl lock on <run_dir>/run.lock, which records host, pid and start time,
        held by rank 0 (or by the `--nproc` parent for its trainers) for the life of the run: a second run
        on the same directory refuses, naming the holder; a lock left by a killed run is said and taken over
    clear_outputs(run_dir)   `--overwrite`: remove the old run's checkpoints and logs, under the lock

Reads only meta.json (no hashing): the loop verifies the checkpoint it loads, and checks its shape again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coe_dist.config import ConfigError, RunConfig
from coe_dist.errors import UserError
from coe_dist.train import checkpoint

LOCK_FILE = "run.lock"
LOCK_OWNER_VAR = "COE_DIST_RUN_LOCK_PID"  # set by `coe-dist train --nproc` for the trainers it starts
# What a fresh start with --overwrite removes: everything an earlier run left that a later one would mix with.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "samples", "stopped.json", "coselection.safetensors")


class RunDirError(UserError, OSError):
    """log.run_dir cannot be created or written, or another run is using it."""


def check_run_dir(run_dir: Path) -> None:
    """Fail before any process group or data work when the run directory cannot be written."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"log.run_dir={str(run_dir)!r} cannot be written ({e.strerror or e}): choose a writable "
                          "directory with --set log.run_dir=PATH") from None


def check_resume_arg(resume: str | None, overwrite: bool) -> None:
    if resume is not None and not resume.strip():
        raise ConfigError("--resume '': empty; give --resume auto (the newest good checkpoint of log.run_dir) or "
                          "a checkpoint directory <run_dir>/checkpoints/step_N")
    if overwrite and resume not in (None, "none"):
        raise ConfigError(f"--overwrite with --resume {resume}: --overwrite starts afresh and deletes the run's "
                          "checkpoints; drop one of the two")


def preflight(cfg: RunConfig, resume: str | None, overwrite: bool, restarted: bool) -> list[str]:
    """Refuse a start that would mix two runs or resume into another model; ConfigError (exit 2). Returns the
    settings a resume changes from its checkpoint's (`checkpoint.changed_settings`), for rank 0 to name."""
    check_resume_arg(resume, overwrite)
    run_dir = Path(cfg.log.run_dir)
    root = run_dir / "checkpoints"
    if restarted:  # a restarted job always continues its own checkpoints
        return []
    if resume in (None, "none"):
        newest = newest_checkpoint(root)
        if newest is not None and not overwrite:
            raise ConfigError(
                f"log.run_dir={str(run_dir)!r} already holds checkpoints of a run (newest: {newest}): continue it "
                "with --resume auto, start elsewhere with --set log.run_dir=NEW_DIR, or delete them and start "
                "afresh with --overwrite")
        return []
    path = newest_checkpoint(root) if resume == "auto" else Path(resume)
    meta = _read_meta(path) if path is not None else None
    if meta is None:  # unreadable or missing: the loop says so when it loads it
        return []
    check_against_checkpoint(cfg, meta, path)
    return checkpoint.changed_settings(cfg, meta)


def newest_checkpoint(root: Path) -> Path | None:
    """The complete step_N with the highest N (not verified)."""
    steps = checkpoint.complete_steps(root)
    return root / f"step_{max(steps)}" if steps else None


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_against_checkpoint(cfg: RunConfig, meta: dict[str, Any], path: Path) -> None:
    """The checkpoint's model shape equals this config's, and train.steps goes beyond its step."""
    checkpoint.check_model_shape(cfg, meta, path)
    step = int(meta.get("step", 0))
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step of {path} ({step}): nothing to train; "
                          f"set train.steps above {step} to continue, or use `coe-dist eval --checkpoint {path}`")


def clear_outputs(run_dir: Path, say: Callable[[str], None]) -> None:
    """--overwrite: remove what an earlier run left (call with the lock held)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        say(f"coe-dist: --overwrite: removed {', '.join(removed)} of the earlier run in {run_dir}")


# ---------------------------------------------------------------- the lock

def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """Advisory exclusive lock on <run_dir>/run.lock; the kernel drops it when the process dies.

    The file's content (host, pid, time) names the holder; a clean release empties it, so a non-empty
    file that nobody locks is a lock left by a run that was killed: said, and taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, say: Callable[[str], None]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            if str(holder.get("pid")) == os.environ.get(LOCK_OWNER_VAR) and holder.get("host") == socket.gethostname():
                return  # `coe-dist train --nproc` holds it for the trainers it started
            raise RunDirError(f"log.run_dir={str(self.path.parent)!r} is in use by another run ({_describe(holder)}; "
                              f"lock {self.path}): wait for it to end, or use --set log.run_dir=NEW_DIR") from None
        self.fd = fd
        stale = self._holder(fd)
        if stale:
            say(f"coe-dist: taking over {self.path}, left by a run that did not end cleanly ({_describe(stale)}"
                f"{self._fate(stale)})")
        try:
            self._write({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
        except OSError as e:
            self.release()
            raise RunDirError(f"log.run_dir={str(self.path.parent)!r}: cannot write the lock file {self.path} "
                              f"({e.strerror or e}): free space there or use --set log.run_dir=NEW_DIR") from None

    @staticmethod
    def _fate(holder: dict[str, Any]) -> str:
        if holder.get("host") != socket.gethostname():
            return ", another host; its lock is no longer held"
        pid = holder.get("pid")
        return ": that process is not running" if isinstance(pid, int) and not _alive(pid) else \
            ": its lock is no longer held"

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            holder = json.loads(raw) if raw.strip() else {}
        except ValueError:
            holder = {"host": "?", "pid": raw[:40].decode(errors="replace")}
        return holder if isinstance(holder, dict) else {}

    def _write(self, holder: dict[str, Any]) -> None:
        """In place (the lock belongs to this inode): truncate, write, fsync."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Empty the record (a clean end), then unlock. The file stays: removing it would race a new run."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # the lock still goes with the close; the next run then reports it as left over
        os.close(self.fd)
        self.fd = None
