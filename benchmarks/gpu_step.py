"""Training step of a config on one GPU: tokens/s, model FLOP utilisation (MFU) and peak memory.

    .venv/bin/python benchmarks/gpu_step.py [--config configs/paper/coe-2-4of64.yaml] [--warmup 3] [--steps 10]

Runs the real trainer (`coe-dist train`, one process, ZeRO-2, bf16 autocast over float32 weights) for
warm-up + measured steps in a temporary run directory and reads its metrics.jsonl: tokens/s is the median
over the measured steps, peak memory torch.cuda.max_memory_allocated after the last step. MFU = 3 x forward
FLOPs per token (benchmarks/train_step.py's count) x tokens/s / the GPU's dense bf16 peak (PEAK_BF16, from
the datasheet). Without CUDA it says so, writes {"cuda": false} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

try:
    from benchmarks.common import measure_on_cuda
    from benchmarks.train_step import flops_per_token
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import measure_on_cuda
    from train_step import flops_per_token

from coe_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak per GPU (NVIDIA H100 SXM / H200 SXM datasheets: 1,979 TFLOPS with sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def run(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="gpu-step-") as tmp:
        sets = [*overrides, f"train.steps={warmup + steps}", "log.log_interval=1", "log.eval_batches=0",
                f"log.run_dir={tmp}", "log.tensorboard=false", "train.device=cuda", "moe.ep_size=1"]
        cmd = [sys.executable, "-m", "coe_dist.cli", "train", "--config", config]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"cuda": True, "error": f"trainer exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    measured = [r["tokens_per_s"] for r in train[warmup:]]
    tokens_per_s = statistics.median(measured)
    flops = 3.0 * sum(flops_per_token(cfg).values())
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    return {"cuda": True, "gpu": gpu, "config": config, "tokens_per_s": tokens_per_s,
            "model_tflops": flops * tokens_per_s / 1e12, "mfu": flops * tokens_per_s / peak if peak else None,
            "peak_memory_mib": max(r.get("peak_memory_mib", 0.0) for r in train), "steps": len(measured)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "paper" / "coe-2-4of64.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_step.json"))
    args = p.parse_args(argv)
    return measure_on_cuda("gpu_step", args.out, lambda: run(args.config, args.overrides, args.warmup, args.steps))


if __name__ == "__main__":
    sys.exit(main())
