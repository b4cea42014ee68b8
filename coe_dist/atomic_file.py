"""Metadata files that are either the old version or the new one, never half of either.

    text -> <dir>/.<name>.tmp-<pid> -> write, flush, fsync -> rename over <name> -> fsync <dir>

Every small file the trainer may be stopped in the middle of writing goes through `write_atomic`:
`checkpoints/latest`, each checkpoint's `meta.json`, `stopped.json`, `config.yaml` and `run_info.json`.
A failed write (a full disk) removes its temporary file and re-raises the OSError; the old file stays.
`DISK_ERRNOS`: the errors that mean "the file system cannot take this write", which callers turn into one
line naming the file, the key that put it there and the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace `path` by `text` atomically (write + fsync + rename); on failure the old file is untouched.
    A symlink keeps pointing where it did: the file it names is replaced (the temporary file goes next to it)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None  # name the file, not its temp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
