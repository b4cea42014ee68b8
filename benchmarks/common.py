"""Helpers shared by the benchmarks: timing on a noisy machine, the large-GEMM limit, environment facts,
JSON output.

On a small shared CPU, absolute times drift by tens of percent between runs: measure the things to be
compared in the same run, interleaved (round-robin), and quote medians.

The limit a benchmark reports against is the large-GEMM rate of each dtype its FLOPs run in (`large_gemm`),
measured in the same run: what the hardware does on one large matmul, not on the workload's own small ones.
A workload with F_bf16 bf16 FLOPs and F_fp32 float32 FLOPs cannot take less than
F_bf16 / R_bf16 + F_fp32 / R_fp32 seconds (`limit_seconds`); its share of that limit is limit / measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from coe_dist.atomic_file import write_atomic
from coe_dist.bench.machine import cpu_model, load_average


def add_layer_shape_args(p: argparse.ArgumentParser, experts_help: str = "routed experts N") -> None:
    """The layer shape the speed benchmarks share (issue 7's: 4096 tokens, d=512, f=352, 64 + 1 experts)."""
    p.add_argument("--tokens", type=int, default=4096, help="tokens (per rank)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (for the seq aux loss)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=352, help="expert width f")
    p.add_argument("--experts", type=int, default=64, help=experts_help)
    p.add_argument("--shared", type=int, default=1, help="shared experts")


GEMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def large_gemm(dtype: torch.dtype, m: int, k: int, n: int, flops: float) -> tuple[Callable[[], None], float]:
    """One large GEMM, [m, k] x [k, n] in `dtype`, in the three layouts training runs it in (forward x W^T,
    grad-input dy W, grad-weight dy^T x), repeated until about `flops` per call: the work of what it is
    compared with, so both see the same timer granularity and drift. Returns (fn, FLOPs per call)."""
    g = torch.Generator().manual_seed(1)
    x, w, dy = (torch.randn(*shape, generator=g).to(dtype) for shape in ((m, k), (n, k), (m, n)))
    # Into preallocated outputs: a fresh large tensor can be over glibc's mmap threshold, and its page faults
    # are no part of the GEMM rate.
    y, dx, dw = torch.empty(m, n, dtype=dtype), torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
    per_pass = 3 * 2.0 * m * k * n
    passes = max(1, round(flops / per_pass))

    def run() -> None:
        for _ in range(passes):
            torch.mm(x, w.t(), out=y)
            torch.mm(dy, w, out=dx)
            torch.mm(dy.t(), x, out=dw)
    return run, passes * per_pass


def limit_seconds(flops_by_dtype: dict[str, float], rate_by_dtype: dict[str, float]) -> float:
    """The least time the FLOPs can take: each dtype's FLOPs at that dtype's large-GEMM rate (FLOP/s)."""
    return sum(f / rate_by_dtype[dtype] for dtype, f in flops_by_dtype.items() if f)


def batch_shape(tokens: int, seq_len: int) -> tuple[int, int]:
    """(B, L) with B * L = tokens, sequences of seq_len (one shorter sequence if tokens < seq_len)."""
    B = max(1, tokens // seq_len)
    L = tokens // B
    assert B * L == tokens, f"--tokens {tokens} must be a multiple of --seq-len {seq_len}"
    return B, L


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], clock: str = "wall") -> float:
    """Seconds of one call (CPU ops are synchronous). clock "wall" = elapsed time; "cpu" = CPU time of this
    process (all threads), which on a shared machine excludes the time spent waiting for a core: with one
    thread it is a contention-robust measure; with several it also counts spin-waits at barriers."""
    now = CLOCKS[clock]
    t0 = now()
    fn()
    return now() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                repeats_of: dict[str, int] | None = None, clock: str = "wall") -> dict[str, list[float]]:
    """Time each function `repeats` times after `warmup` untimed calls, round-robin so that drift in the
    machine's speed hits all of them alike. `repeats_of` lowers the count (and warm-up to at most one)
    for slow functions; their timed calls are spread evenly over the rounds."""
    repeats_of = repeats_of or {}
    rounds: dict[str, set[int]] = {}
    for name, fn in fns.items():
        n = min(repeats_of.get(name, repeats), repeats)
        rounds[name] = {i * repeats // n for i in range(n)}
        for _ in range(warmup if n == repeats else min(warmup, 1)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if r in rounds[name]:
                times[name].append(timed(fn, clock))
    return times


def summary(times: list[float]) -> dict[str, float]:
    ts = sorted(times)
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "n": len(ts)}


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "loadavg_at_start": load_average(),
    }


def start_gloo_ranks() -> tuple[int, int]:
    """One intra-op thread per rank (ranks share the cores) and a gloo group: (rank, world size)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def mean_over_ranks(mine: dict[str, float], world: int, slowest: tuple[str, ...] = ()) -> dict[str, float]:
    """Every rank's figures averaged (collective); the keys in `slowest` take the largest rank's value."""
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    out = {}
    for key in mine:
        values = [r[key] for r in everyone]
        out[key] = max(values) if key in slowest else sum(values) / world
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_json(path: str | Path, data: dict) -> Path:
    """The results, with the machine they were measured on (times and losses compare only within one machine),
    written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**data, "environment": data.get("environment") or environment()}
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def measure_on_cuda(name: str, out: str | Path, measure: Callable[[], dict]) -> int:
    """Run a GPU-only benchmark: without CUDA say so and record {"cuda": false}; either way write `out`, exit 0."""
    if torch.cuda.is_available():
        result = measure()
        print(json.dumps(result, indent=1))
    else:
        print(f"{name}: no CUDA device: nothing measured")
        result = {"cuda": False}
    write_json(out, result)
    return 0


def exit_without_destructors(code: int) -> None:
    """Leave at once. Once DeepSpeed's expert groups have carried an all-to-all, about one exit in three
    aborted in static destructors after everything was done ("terminate called without an active exception",
    no Python frame); os._exit skips them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_workers(agent_pid: int) -> list[int]:
    """The trainer processes of a torchrun agent: its children (every thread's /proc children list)."""
    pids: list[int] = []
    for task in Path(f"/proc/{agent_pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:  # the thread or the agent has exited
            pass
    return sorted(set(pids))


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave a worker (its environment); None once it has exited or where there is none."""
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"RANK="):
                return int(item[5:])
    except (OSError, ValueError):
        return None
    return None
