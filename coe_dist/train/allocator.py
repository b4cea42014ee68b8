"""glibc malloc settings for CPU training: keep large blocks in the heap instead of one mmap() per tensor.

Why: glibc serves every block at or above M_MMAP_THRESHOLD (at most 32 MiB) with a fresh mmap() and unmaps it on
free. A CPU training step allocates and frees many tensors that big ([T*K, d] float32 activations and their
gradients, [E, 2F, D] float32 expert-weight gradients, DeepSpeed's flat gradient buffers), so each one pays a page
fault plus kernel zeroing for every 4 KiB page on first touch, and an munmap() on free, again every step. With
M_MMAP_THRESHOLD raised they come from the heap, where a freed block is reused without touching the kernel, and
M_TRIM_THRESHOLD stops free() from giving the top of the heap back (which the next step would fault in again).
Measured in docs/performance.md ("Training step"). The price: a process keeps its peak heap; its RSS does not
shrink after the peak.

CPU only by default: with a CUDA device the large tensors live in device memory. COE_DIST_MALLOC_TUNING=0 turns
the settings off, =1 applies them on a CUDA machine too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

from coe_dist.config import ConfigError

ENV = "COE_DIST_MALLOC_TUNING"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, i.e. never trim


def tune_glibc_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set both thresholds process-wide. False where there is no glibc mallopt (musl, macOS) or it refuses."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def configure(env: Mapping[str, str] | None = None) -> str:
    """Apply the settings unless the environment opts out; returns what was done, for the start-up log."""
    env = os.environ if env is None else env
    setting = env.get(ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return f"glibc malloc: defaults ({ENV}={env[ENV]})"
    if setting not in ("1", "on", "true", "yes", "auto"):
        raise ConfigError(f"{ENV}={env[ENV]!r}: use 0 (off), 1 (on) or leave it unset (on when there is no CUDA)")
    if setting == "auto":
        import torch

        if torch.cuda.is_available():
            return "glibc malloc: defaults (CUDA device present)"
    if not tune_glibc_malloc():
        return "glibc malloc: defaults (mallopt not available)"
    return f"glibc malloc: large blocks kept in the heap ({ENV}=0 turns this off)"
