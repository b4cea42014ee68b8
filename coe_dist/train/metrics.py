"""One logger for a run: TensorBoard under <run_dir>/tb and the same scalars as JSON lines in
<run_dir>/metrics.jsonl. Only rank 0 writes; other ranks get a logger that drops everything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, counts: Any) -> None:
        """Expert load as a histogram whose bucket i holds the count of expert i."""
        if not self.enabled or self.tb is None:
            return
        counts = np.asarray(counts, dtype=np.float64)
        n = len(counts)
        self.tb.add_histogram_raw(tag, min=0.0, max=float(n - 1), num=float(counts.sum()),
                                  sum=float((counts * np.arange(n)).sum()),
                                  sum_squares=float((counts * np.arange(n) ** 2).sum()),
                                  bucket_limits=[i + 0.5 for i in range(n)], bucket_counts=counts.tolist(),
                                  global_step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
