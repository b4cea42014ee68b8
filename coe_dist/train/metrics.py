"""One logger for a run: TensorBoard under <run_dir>/tb and the same scalars as JSON lines in
<run_dir>/metrics.jsonl. Only rank 0 writes; other ranks get a logger that drops everything.

A write the file system refuses (full disk) is re-raised as an OSError that names the file: the jsonl
line-buffered write gives none, and TensorBoard's writer thread hands its error to the next call."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.jsonl_path = self.tb_path = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path, self.tb_path = run_dir / "metrics.jsonl", run_dir / "tb"
        self.jsonl = self.jsonl_path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread_errors()
            with _naming(self.tb_path):
                self.tb = SummaryWriter(log_dir=str(self.tb_path))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        with _naming(self.jsonl_path):
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            with _naming(self.tb_path):
                for key, value in clean.items():
                    self.tb.add_scalar(key, value, step)

    def histogram(self, step: int, tag: str, counts: Any) -> None:
        """Expert load as a histogram whose bucket i holds the count of expert i."""
        if not self.enabled or self.tb is None:
            return
        counts = np.asarray(counts, dtype=np.float64)
        n = len(counts)
        with _naming(self.tb_path):
            self._histogram(step, tag, counts, n)

    def _histogram(self, step: int, tag: str, counts: np.ndarray, n: int) -> None:
        self.tb.add_histogram_raw(tag, min=0.0, max=float(n - 1), num=float(counts.sum()),
                                  sum=float((counts * np.arange(n)).sum()),
                                  sum_squares=float((counts * np.arange(n) ** 2).sum()),
                                  bucket_limits=[i + 0.5 for i in range(n)], bucket_counts=counts.tolist(),
                                  global_step=step)

    def close(self, raise_errors: bool = True) -> None:
        """Close both files; `raise_errors=False` after another failure, which is the one to report."""
        errors = []
        for path, f in ((self.jsonl_path, self.jsonl), (self.tb_path, self.tb)):
            if f is None:
                continue
            try:
                with _naming(path):
                    f.close()
            except OSError as e:
                errors.append(e)
        self.jsonl = self.tb = None
        if errors and raise_errors:
            raise errors[0]


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread dies on a failed write with a traceback on stderr, then hands the same
    error to the next add_* call in the training thread, which reports it as one line: drop the traceback."""
    previous = threading.excepthook
    if getattr(previous, "coe_dist_quiet", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.coe_dist_quiet = True
    threading.excepthook = hook


@contextlib.contextmanager
def _naming(path: Path):
    """Re-raise an OSError with `path` as its filename (buffered writes and writer threads lose it)."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
