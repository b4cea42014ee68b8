"""Facts about the machine that every benchmark records next to its numbers (`bench comm`, benchmarks/):
the CPU model, and the load average, which says how shared the machine was while it measured."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; '' where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the system does not give them. Rounded to the
    two decimals of /proc/loadavg: glibc's getloadavg adds digits of fixed-point noise (2.26025390625)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # AttributeError: no os.getloadavg (Windows)
        return None
