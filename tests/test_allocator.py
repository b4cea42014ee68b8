"""coe_dist.train.allocator: the glibc malloc settings of the training process, and their opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coe_dist.train import allocator

ROOT = Path(__file__).resolve().parents[1]

# A step-like pattern of large blocks with overlapping lifetimes, 8 times; the page faults of the last 2 rounds.
FAULTS = """
import resource, torch
from coe_dist.train import allocator
print(allocator.configure())
MiB = 2**18  # float32 elements
def step():
    a, b = torch.ones(64 * MiB), torch.ones(32 * MiB)
    del a
    c = torch.ones(48 * MiB)
    del b, c
for i in range(8):
    if i == 6:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _steady_state_faults(setting: str) -> tuple[str, int]:
    env = {**os.environ, allocator.ENV: setting}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True, timeout=120).stdout.splitlines()
    return out[0], int(out[1])


@pytest.fixture
def calls(monkeypatch) -> list[bool]:
    """Record tune_glibc_malloc calls instead of changing this (pytest) process's allocator."""
    seen: list[bool] = []
    monkeypatch.setattr(allocator, "tune_glibc_malloc", lambda: seen.append(True) or True)
    return seen


def test_tuned_heap_serves_repeated_large_blocks_without_page_faults():
    """The reason for the settings: by default every block over the mmap threshold is a fresh mmap (one fault
    per 4 KiB page: 2 x 36,864 for two rounds), tuned the heap serves them once it has grown (a few rounds:
    glibc 2.36's memalign cannot reuse a freed block for a request of the same size)."""
    note, default = _steady_state_faults("0")
    assert "defaults" in note and default > 60_000, (note, default)
    note, tuned = _steady_state_faults("1")
    assert "kept in the heap" in note and tuned < 1_000, (note, tuned)


@pytest.mark.parametrize("setting", ["0", "off", "False"])
def test_opt_out_leaves_malloc_alone(calls, setting):
    assert allocator.configure({allocator.ENV: setting}) == f"glibc malloc: defaults ({allocator.ENV}={setting})"
    assert calls == []


def test_auto_tunes_on_cpu_only_machines(calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "kept in the heap" in allocator.configure({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert allocator.configure({}) == "glibc malloc: defaults (CUDA device present)"
    assert "kept in the heap" in allocator.configure({allocator.ENV: "1"})  # forced on with CUDA too
    assert calls == [True, True]


def test_bad_setting_is_a_config_error_naming_the_variable():
    """`python -m coe_dist.train` refuses it with exit code 2 before any work."""
    env = {**os.environ, allocator.ENV: "maybe"}
    proc = subprocess.run([sys.executable, "-m", "coe_dist.train", "--config", str(ROOT / "configs" / "tiny.yaml")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{allocator.ENV}='maybe': use 0 (off), 1 (on)" in proc.stderr
