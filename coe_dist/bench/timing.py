"""Phase timers that are correct on CPU and on CUDA, and the barrier that separates phases.

CPU: every torch op (gloo collectives included) returns when its work is done, so wall clock around a
phase is the phase's time. CUDA: ops are queued; a phase is bracketed by two CUDA events on the current
stream (collectives make the current stream wait for the NCCL stream, so the end event follows the
transfer), and the times are read once per step after one synchronisation, so timing adds no host syncs
beyond the ones the protocol has (the count exchange's `.tolist()`).

`barrier(group)` (a one-element all-reduce on the device) lines the ranks up before every communication
phase, so that a rank's all-to-all time is the transfer and not the wait for a slower rank; the wait is
not counted in any phase (it is the load imbalance, visible as the spread between ranks of the phases
before it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class PhaseRecord:
    layer: int
    iteration: int
    phase: str
    direction: str  # fwd | bwd
    bytes_sent: int = 0
    bytes_received: int = 0
    rows: int = 0  # token copies this phase handled on this rank (received rows for expert phases)
    seconds: float = float("nan")
    _events: tuple | None = field(default=None, repr=False)


class PhaseTimer:
    """Collects `PhaseRecord`s for one step; `resolve()` fills in the seconds (one sync on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.records: list[PhaseRecord] = []

    @contextmanager
    def phase(self, layer: int, iteration: int, phase: str, direction: str) -> Iterator[PhaseRecord]:
        rec = PhaseRecord(layer, iteration, phase, direction)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield rec
            end.record()
            rec._events = (start, end)
        else:
            t0 = time.perf_counter()
            yield rec
            rec.seconds = time.perf_counter() - t0
        self.records.append(rec)

    def resolve(self) -> list[PhaseRecord]:
        if self.cuda:
            torch.cuda.synchronize()
            for rec in self.records:
                start, end = rec._events
                rec.seconds = start.elapsed_time(end) / 1e3
                rec._events = None
        return self.records


def barrier(group, device: torch.device) -> None:
    """All ranks of `group` reach this point before any leaves (a tiny all-reduce: works on gloo and NCCL,
    and on CUDA it orders the streams as well)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def wall() -> float:
    return time.perf_counter()
