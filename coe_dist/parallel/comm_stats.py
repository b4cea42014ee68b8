"""Per (layer, iteration, direction) all-to-all time and bytes, and dropped-token counts.

The dispatcher records into a `CommStats`; the trainer reads `summary()`, totals since the start (its
per-log-step figures are differences of totals: `train/moe_metrics.CommDelta`). Timings are wall clock
around a blocking collective, or around the wait() of an asynchronous one: the exposed communication time
(on CUDA the CPU waits for the collective's stream).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class CommRecord:
    calls: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0  # bytes to other ranks (the rank's own slice is not on the wire)
    bytes_received: int = 0


class CommStats:
    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.records: dict[tuple[int, str], CommRecord] = defaultdict(CommRecord)
        self.dropped: dict[int, int] = defaultdict(int)  # iteration -> token copies dropped by capacity

    @contextmanager
    def timed(self, iteration: int, direction: str, bytes_sent: int, bytes_received: int,
              device: torch.device) -> Iterator[None]:
        sync = device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(device)
        rec = self.records[(iteration, direction)]
        rec.calls += 1
        rec.seconds += time.perf_counter() - start
        rec.bytes_sent += bytes_sent
        rec.bytes_received += bytes_received

    def add_dropped(self, iteration: int, count: int) -> None:
        self.dropped[iteration] += count

    def summary(self) -> dict[str, float]:
        """Flat scalars, e.g. `comm/layer1/iter0/dispatch_fwd/seconds`."""
        out: dict[str, float] = {}
        for (iteration, direction), rec in sorted(self.records.items()):
            prefix = f"comm/layer{self.layer}/iter{iteration}/{direction}"
            out[f"{prefix}/seconds"] = rec.seconds
            out[f"{prefix}/bytes_sent"] = float(rec.bytes_sent)
            out[f"{prefix}/bytes_received"] = float(rec.bytes_received)
            out[f"{prefix}/calls"] = float(rec.calls)
        for iteration, count in sorted(self.dropped.items()):
            out[f"moe/layer{self.layer}/iter{iteration}/dropped_tokens"] = float(count)
        return out

    def reset(self) -> None:
        """Start counting afresh (the benchmarks measure one step at a time)."""
        self.records.clear()
        self.dropped.clear()
